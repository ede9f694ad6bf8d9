"""Decode and greedy generation: against transformers' own generate (identity config), against an
independent eager reference of decode after a pruned prefill (tests/reference.py), batches of
different lengths against each sample alone, streaming, one AOTInductor engine, and errors."""
import pytest
import torch

from fastmmoe_compile import FastMMoEConfig, compile_model, load_engine
from fastmmoe_compile.config import FastVConfig
from fastmmoe_compile.models import load_model
from fastmmoe_compile.runtime.generate import DecodeUnavailableError

from .conftest import TINY
from .reference import eager_generate

NEW = 16
_MODELS, _ENGINES = {}, {}


def sharp_model(name: str, layers: int | None = None):
    """A tiny model with weights at std 0.15: greedy tokens vary and top-2 logit gaps stay >= 1e-3
    (the from_config init gives near-flat logits and one repeated token). layers: fewer decoder layers."""
    if (name, layers) not in _MODELS:
        loaded = load_model(name)
        if layers is not None:
            from transformers import AutoModelForCausalLM

            config = loaded.config
            config.num_hidden_layers = layers
            loaded = load_model(AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval())
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in loaded.lm.parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.15)
        _MODELS[name, layers] = loaded
    return _MODELS[name, layers]


def engine(name: str, config, key: str):
    if (name, key) not in _ENGINES:
        _ENGINES[name, key] = compile_model(sharp_model(name), config, backend="export", quiet=True)
    return _ENGINES[name, key]


def ids_of(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(seed))


def hf_generate(lm, ids: torch.Tensor) -> list[int]:
    with torch.no_grad():
        out = lm.generate(ids[None], do_sample=False, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
    return out[0, ids.numel():].tolist()


@pytest.mark.parametrize("name", TINY)
def test_identity_generate_equals_transformers(name):
    """Kv = K and no merges: two prompts of different lengths (one with vision tokens), batched,
    each equal to transformers' greedy generate of that prompt alone, token for token."""
    loaded = sharp_model(name)
    eng = engine(name, FastMMoEConfig(vision_expert_ratio=1.0), "identity")
    prompts = [ids_of(12, 1), ids_of(9, 2)]
    out = eng.generate(prompts, vision_positions=[torch.arange(2, 8), None], max_new_tokens=NEW)
    for ids, tokens in zip(prompts, out):
        assert tokens.tolist() == hf_generate(loaded.lm, ids)


MERGE = FastMMoEConfig(reduce_from_layer=1, vision_expert_ratio=0.5, merge_layers=(1,), keep_ratio=0.5)
PRUNED = {  # config, reference (reduce_from_layer, kv, stages)
    "merge": (MERGE, (1, 2, {1: (0.5, MERGE.merge_ratio, MERGE.window, MERGE.alpha, MERGE.strategy,
                                 MERGE.merge_method)})),
    "fastv": (FastVConfig(prune_layer=2, keep_ratio=0.5), (99, 4, {2: (0.5, 0.0, 2, 0.0, "attention", "mean")})),
}


@pytest.mark.parametrize("name,kind", [("tiny-qwen3-moe", "merge"), ("tiny-deepseek-v2", "merge"),
                                       ("tiny-glm4-moe", "fastv")])
def test_pruned_generate_equals_eager_reference(name, kind):
    """Decode after Top-Kv + merges (or FastV): every layer attends to its own cache, positions continue
    from the original prompt length; greedy tokens equal the eager reference's."""
    loaded = sharp_model(name)
    config, (lv, kv, stages) = PRUNED[kind]
    eng = engine(name, config, kind)
    seq, vision = 30, torch.arange(4, 24)
    embeds = loaded.lm.model.embed_tokens(ids_of(seq, 3))[None].detach()
    mask = torch.zeros(1, seq, dtype=torch.bool)
    mask[0, vision] = True

    prefill = eng.prefill(inputs_embeds=embeds, vision_positions=vision[None])
    layer = min(stages)
    lengths = [k.shape[2] for k, _ in prefill.cache]
    kept = prefill.kept_positions.shape[1]
    assert kept < seq and lengths == [seq] * (layer + 1) + [kept] * (len(lengths) - layer - 1)

    out = eng.generate(inputs_embeds=embeds, vision_positions=vision[None], max_new_tokens=NEW)
    reference = eager_generate(loaded.lm, embeds, mask, lv, kv, stages, NEW)
    assert out[0].tolist() == reference[0]
    # Positions matter: re-indexing the kept tokens (or a shared cache length) would change the tokens.
    assert len(set(reference[0])) > 3


def test_cache_outputs_leave_the_golden_graph_diff_unchanged():
    """The KV cache outputs change nothing the passes do: the cached program's diff is the golden one,
    and caches of layers after each merge come out shorter by construction."""
    from fastmmoe_compile.api import rewrite

    from .conftest import tiny_model
    from .test_graph_diff import CASES, GOLDEN

    name, config = CASES["routing_merge-tiny-qwen3-moe"]  # merges at layers 1 and 3
    _, program, record = rewrite(tiny_model(name), config, cache=True)
    assert record.graph_diff == (GOLDEN / "routing_merge-tiny-qwen3-moe.txt").read_text()
    with torch.no_grad():
        out = program.module()(torch.randn(1, 40, 64), torch.arange(6, 30)[None])
    # 24 vision tokens -> 16 after layer 1 -> 11 after layer 3 (whose own cache still holds 16)
    assert [k.shape[2] for k in out[2::2]] == [40, 40, 32, 32] and out[1].shape[1] == 27


def test_batch_of_different_lengths_equals_each_alone_and_stream():
    """Three samples of different lengths and vision counts (two prefill groups), decoded together
    with padded per-layer caches: each equals itself alone; streaming yields the same tokens."""
    loaded = sharp_model("tiny-qwen3-moe")
    eng = engine("tiny-qwen3-moe", MERGE, "merge")
    hidden = loaded.config.hidden_size
    g = torch.Generator().manual_seed(7)
    samples = [torch.randn(s, hidden, generator=g) for s in (26, 18, 26)]
    vision = [torch.arange(3, 19), torch.arange(2, 8), torch.arange(5, 21)]
    batch = eng.generate(inputs_embeds=samples, vision_positions=vision, max_new_tokens=NEW)
    for e, v, tokens in zip(samples, vision, batch):
        alone = eng.generate(inputs_embeds=[e], vision_positions=[v], max_new_tokens=NEW)[0]
        assert tokens.tolist() == alone.tolist()
    steps = list(eng.generate(inputs_embeds=samples, vision_positions=vision, max_new_tokens=NEW, stream=True))
    assert len(steps) == NEW
    assert [[s[i] for s in steps] for i in range(3)] == [t.tolist() for t in batch]

    eos = int(batch[1][3])  # sample 1 ends at its 4th token (or earlier, at an earlier eos)
    ended = eng.generate(inputs_embeds=samples, vision_positions=vision, max_new_tokens=NEW, eos_token_id=eos)
    for full, cut in zip(batch, ended):
        stop = full.tolist().index(eos) + 1 if eos in full.tolist() else NEW
        assert cut.tolist() == full.tolist()[:stop]


def test_decode_step_by_step_equals_generate():
    """The lower-level API: prefill -> start_decode -> decode, one token at a time."""
    eng = engine("tiny-qwen3-moe", MERGE, "merge")
    ids = ids_of(20, 5)[None]
    vision = torch.arange(3, 15)[None]
    result = eng.prefill(ids, vision_positions=vision)
    state = eng.start_decode(result, max_new_tokens=4)
    tokens = [int(result.logits.argmax(-1))]
    for _ in range(3):
        tokens.append(int(eng.decode(state, torch.tensor([[tokens[-1]]])).argmax(-1)))
    assert tokens == eng.generate(ids, vision_positions=vision, max_new_tokens=4)[0].tolist()
    assert state.positions.tolist() == [23]
    eng.decode(state, torch.tensor([[tokens[-1]]]))  # room for max_new_tokens steps
    with pytest.raises(ValueError, match="full"):
        eng.decode(state, torch.tensor([[1]]))


def test_errors():
    eng = engine("tiny-qwen3-moe", MERGE, "merge")
    result = eng.prefill(ids_of(10, 0)[None])
    state = eng.start_decode(result, max_new_tokens=2)
    with pytest.raises(TypeError, match="DecodeState"):
        eng.decode(None, torch.tensor([[1]]))
    with pytest.raises(ValueError, match="one token per sample"):
        eng.decode(state, torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="one token per sample"):
        eng.decode(state, torch.tensor([[1], [2]]))
    with pytest.raises(ValueError, match="exactly one"):
        eng.generate(max_new_tokens=2)
    with pytest.raises(ValueError, match=r"sample 1: vision_positions must lie in \[0, 5\)"):
        eng.generate([ids_of(8, 0), ids_of(5, 0)], vision_positions=[[1, 2], [3, 7]], max_new_tokens=2)
    with pytest.raises(ValueError, match="2 samples but vision tokens for 1"):
        eng.generate([ids_of(8, 0), ids_of(5, 0)], vision_positions=[[1, 2]], max_new_tokens=2)
    with pytest.raises(ValueError, match="S >= 2"):
        eng.generate([ids_of(1, 0)], max_new_tokens=2)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        eng.generate(inputs_embeds=[torch.zeros(1, 64)], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        eng.generate([ids_of(4, 0)], max_new_tokens=0)
    with pytest.raises(ValueError, match=r"\[S, 64\]"):
        eng.generate(inputs_embeds=[torch.zeros(5, 3)], max_new_tokens=2)


def test_engine_without_decode_program(tmp_path):
    """An engine dir from before decode (no decode program, no cache outputs): prefill works,
    decode and generate say what to do."""
    loaded = sharp_model("tiny-olmoe")
    eng = compile_model(loaded, FastMMoEConfig(), out=tmp_path / "e", backend="export", quiet=True, decode=False)
    old = load_engine(tmp_path / "e")
    assert "decode" not in old.manifest["programs"] and not (tmp_path / "e" / "decode.pt2").exists()
    result = old.prefill(ids_of(6, 0)[None])
    assert result.logits.shape == (1, 256) and result.cache is None
    for call in (lambda: old.generate(ids_of(6, 0), max_new_tokens=4),
                 lambda: old.start_decode(result, 4),
                 lambda: old.decode(None, torch.tensor([[1]]))):
        with pytest.raises(DecodeUnavailableError, match="no decode program.*recompile"):
            call()
    assert eng.decode_step is None


@pytest.mark.slow
@pytest.mark.aoti("the decode program and per-layer caches of different lengths through AOTInductor packages")
def test_aoti_engine_generates(tmp_path):
    """compile_model(out=dir) with AOTInductor -> load_engine -> generate, merges included,
    for a batch of different lengths: the same tokens as the ExportedProgram engine.
    (2 layers: two AOTInductor compiles of a 4-layer model take minutes on 2 busy cores.)"""
    model = sharp_model("tiny-qwen3-moe", layers=2)
    eng = compile_model(model, MERGE, out=tmp_path / "aoti", quiet=True)
    loaded = load_engine(tmp_path / "aoti")
    assert loaded.manifest["programs"]["decode"]["file"] == "decode.pt2" and (tmp_path / "aoti" / "decode.pt2").is_file()
    prompts = [ids_of(26, 11), ids_of(15, 12), ids_of(2, 13)]
    vision = [torch.arange(3, 19), torch.arange(1, 9), None]
    out = loaded.generate(prompts, vision_positions=vision, max_new_tokens=NEW)
    reference = compile_model(model, MERGE, backend="export", quiet=True)
    expected = reference.generate(prompts, vision_positions=vision, max_new_tokens=NEW)
    assert [t.tolist() for t in out] == [t.tolist() for t in expected]
    assert eng.decode_step is not None
