"""The onnx backend: ONNX Runtime engines compute what the rewritten program computes (Top-Kv,
token merging, FastV; three families, deepseek_v2's complex rotary embedding as real pairs; batch 1
and 2; several sequence and vision lengths), keep
Top-Kv's savings (the grouped GEMM sees exactly the routed pairs), and pass the ONNX checker
with full shape inference. Decode: the ORT decode step (decode.onnx) gives the export backend's
logits and K/V rows, and greedy generate gives its tokens (identity; Top-Kv + merge; batches
of different lengths)."""
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed")

from fastmmoe_compile import FastMMoEConfig, FastVConfig, compile_model, load_engine  # noqa: E402
from fastmmoe_compile.api import rewrite  # noqa: E402
from fastmmoe_compile.cli import main  # noqa: E402
from fastmmoe_compile.lower.onnx import DOMAIN, export_onnx  # noqa: E402
from fastmmoe_compile.runtime.generate import DecodeUnavailableError  # noqa: E402
from fastmmoe_compile.runtime.onnx_runtime import OrtBackbone  # noqa: E402

from .conftest import hf_last_logits, tiny_model  # noqa: E402
from .test_decode import MERGE as DECODE_MERGE  # noqa: E402
from .test_decode import NEW, ids_of, sharp_model  # noqa: E402

pytestmark = pytest.mark.onnx("this file tests the ONNX backend itself: the exporter's graph, ONNX Runtime's "
                              "numerics against the export backend, the ONNX checker")

TOPKV = FastMMoEConfig(vision_expert_ratio=0.5, reduce_from_layer=1)
# Top-Kv and two merge stages; a merge ratio high enough that windows really merge (M > 0) at these N
MERGE = FastMMoEConfig(vision_expert_ratio=0.5, reduce_from_layer=1, merge_layers=(1, 2), keep_ratio=0.5,
                       merge_ratio=0.3)
FASTV = FastVConfig(prune_layer=2, keep_ratio=0.5)
CASES = ["qwen3-topkv", "deepseek2-merge", "qwen3-fastv"]  # deepseek_v2: its complex rotary as real pairs
# (batch, seq, vision positions): batch 1 and 2, a prompt without vision tokens, vision at the end
SHAPES = [(1, 20, range(3, 11)), (2, 33, range(5, 30)), (2, 9, range(0)), (1, 16, range(4, 15))]


@pytest.fixture(scope="session")
def onnx_engines(tmp_path_factory):
    """(loaded, program, engine dir) per case: one export each for the whole session. The first
    goes through compile_model (an engine dir, loaded by load_engine), the others straight
    through export_onnx into a directory of their own (to save a second rewrite). Prefill only
    (decode=False): decode is tested on the sharper models of onnx_decode_engine."""
    root = tmp_path_factory.mktemp("onnx")
    cases = {}
    for key, name, config in [("qwen3-topkv", "tiny-qwen3-moe", TOPKV), ("deepseek2-merge", "tiny-deepseek-v2", MERGE),
                              ("qwen3-fastv", "tiny-qwen3-moe", FASTV)]:
        loaded = tiny_model(name)
        _, program, _ = rewrite(loaded, config)
        out = root / key
        if key == "qwen3-topkv":
            compile_model(loaded, config, out, backend="onnx", quiet=True, decode=False)
        else:
            out.mkdir()
            export_onnx(program, out / "backbone.onnx")
        cases[key] = (loaded, program, out)
    return cases


def _runner(out):
    """prefill of the engine dir, or the bare ORT session where the case has no manifest."""
    if (out / "manifest.json").is_file():
        engine = load_engine(out)
        assert engine.manifest["backend"] == "onnx"

        def run(embeds, positions):
            result = engine.prefill(inputs_embeds=embeds, vision_positions=positions)
            return result.logits, result.kept_positions

        return run
    return OrtBackbone(out / "backbone.onnx")


def _inputs(loaded, batch, seq, vision, seed=0):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, seq, loaded.config.hidden_size, generator=g)
    positions = torch.tensor(list(vision), dtype=torch.long).expand(batch, -1).contiguous()
    return embeds, positions


@pytest.mark.parametrize("key", CASES)
def test_onnx_engine_matches_the_program(onnx_engines, key):
    loaded, program, out = onnx_engines[key]
    run, module = _runner(out), program.module()
    for i, (batch, seq, vision) in enumerate(SHAPES):
        embeds, positions = _inputs(loaded, batch, seq, vision, seed=i)
        logits, kept = run(embeds, positions)[:2]
        with torch.no_grad():
            expected = module(embeds, positions)
        torch.testing.assert_close(logits, expected[0], atol=1e-4, rtol=0)
        assert torch.equal(kept, expected[1])
        if key != "qwen3-topkv" and len(vision) > 2:
            assert kept.shape[1] < seq  # the reduced configs did drop tokens
        if not vision:  # no vision token: the original model
            torch.testing.assert_close(logits, hf_last_logits(loaded, embeds), atol=1e-4, rtol=0)


def test_onnx_model_passes_the_checker(onnx_engines):
    for _, _, out in onnx_engines.values():
        onnx.checker.check_model(str(out / "backbone.onnx"), full_check=True)
        model = onnx.load(str(out / "backbone.onnx"))
        assert [i.name for i in model.graph.input] == ["inputs_embeds", "vision_positions"]
        dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
        assert all(isinstance(d, str) for d in dims[0][:2] + dims[1]), dims  # batch, sequence, vision are dynamic


def _vision_per_moe_layer(loaded, config, n: int) -> list[int]:
    """Vision tokens reaching each MoE layer's experts: docs/fastmmoe.md, a merge stage at layer l (before
    its MoE) keeps min(N, max(1, floor(N * r))) of N, r = keep_ratio^(1 / stages)."""
    import math

    r = config.keep_ratio ** (1 / len(config.merge_layers)) if config.merge_layers else 1.0
    counts = []
    for layer in range(loaded.config.num_hidden_layers):
        if layer in config.merge_layers:
            n = min(n, max(1, math.floor(n * r)))
        counts.append(n)
    return [counts[i] for i, _ in loaded.family.moe_blocks(loaded.lm)]


@pytest.mark.parametrize("key,config", [("qwen3-topkv", TOPKV), ("deepseek2-merge", MERGE)])
def test_onnx_moe_computes_only_the_routed_pairs(onnx_engines, tmp_path, key, config):
    """Every expert GEMM of the ONNX graph is our grouped_mm (no all-experts matmul), and the rows
    it is handed, counted by running ORT with them as extra outputs, are n_text*K + n_vision*Kv at
    each MoE layer (before reduce_from_layer: K for all; after a merge: the kept vision tokens)."""
    loaded, _, out = onnx_engines[key]
    model = onnx.load(str(out / "backbone.onnx"))
    calls = [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == "grouped_mm"]
    moe = [i for i, _ in loaded.family.moe_blocks(loaded.lm)]
    assert len(calls) == 2 * len(moe)  # gate_up and down per MoE layer
    experts = loaded.family.num_experts(loaded.config)
    for n in model.graph.node:  # no dense expert compute: nothing else reads an [E, ...] expert weight
        if n.op_type in ("MatMul", "Gemm", "Einsum"):
            for name in n.input:
                init = next((t for t in model.graph.initializer if t.name == name), None)
                assert init is None or len(init.dims) < 3 or init.dims[0] != experts, (n.name, name)
    for n in calls[::2]:
        model.graph.output.append(onnx.helper.make_tensor_value_info(n.input[0], onnx.TensorProto.FLOAT, None))
    probe = tmp_path / "probe.onnx"
    onnx.save(model, str(probe))
    session = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
    batch, seq, vision = 2, 33, range(5, 30)
    embeds, positions = _inputs(loaded, batch, seq, vision)
    results = session.run(None, {"inputs_embeds": embeds.numpy(), "vision_positions": positions.numpy()})
    rows = [o.shape[0] for o in results[-len(moe):]]
    k, kv, text = loaded.config.num_experts_per_tok, config.kv(loaded.config.num_experts_per_tok), seq - len(vision)
    expected = [batch * (text * k + n * (kv if layer >= config.reduce_from_layer else k))
                for layer, n in zip(moe, _vision_per_moe_layer(loaded, config, len(vision)))]
    assert rows == expected and expected[-1] < batch * seq * k
    assert results[1].shape == (batch, text + _vision_per_moe_layer(loaded, config, len(vision))[-1])
    if key == "deepseek2-merge":  # no complex type left anywhere in the graph
        inferred = onnx.shape_inference.infer_shapes(onnx.load(str(out / "backbone.onnx")), strict_mode=True)
        types = {v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.output]}
        assert not types & {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}


_EXPORT_ENGINES = {}


def export_engine(model, config, key):
    """The export backend's engine (the reference the ORT engines must match), once per session."""
    if key not in _EXPORT_ENGINES:
        _EXPORT_ENGINES[key] = compile_model(model, config, backend="export", quiet=True)
    return _EXPORT_ENGINES[key]


@pytest.fixture(scope="session")
def onnx_decode_engine(tmp_path_factory):
    """A Top-Kv + merge engine dir with decode (backbone.onnx with cache outputs, decode.onnx), loaded
    back, on a 3-layer model with sharp weights (greedy tokens vary); the merge at layer 1 leaves
    layer 2 a shorter cache than layers 0 and 1."""
    model = sharp_model("tiny-qwen3-moe", layers=3)
    out = tmp_path_factory.mktemp("onnx-decode") / "engine"
    compile_model(model, DECODE_MERGE, out, backend="onnx", quiet=True)
    return model, load_engine(out), export_engine(model, DECODE_MERGE, "qwen3-merge"), out


def test_onnx_decode_step_matches_the_export_backend(onnx_decode_engine):
    """One decode step from the same state: ORT's logits and new K/V rows within 1e-4 of the exported
    step's. ORT's prefill cache outputs (per layer, shortened after the merge) match too."""
    import copy

    _, engine, reference, _ = onnx_decode_engine
    assert engine.manifest["programs"]["decode"]["file"] == "decode.onnx"
    ids, vision = ids_of(24, 4)[None].expand(2, -1), torch.arange(3, 19)[None].expand(2, -1)
    mine, theirs = engine.prefill(ids, vision_positions=vision), reference.prefill(ids, vision_positions=vision)
    assert [k.shape[2] for k, _ in mine.cache] == [24, 24, mine.kept_positions.shape[1]] and \
        mine.kept_positions.shape[1] < 24
    for (k, v), (rk, rv) in zip(mine.cache, theirs.cache):
        torch.testing.assert_close(k, rk, atol=1e-4, rtol=0)
        torch.testing.assert_close(v, rv, atol=1e-4, rtol=0)
    state = reference.start_decode(theirs, max_new_tokens=2)
    twin = copy.deepcopy(state)
    tokens = theirs.logits.argmax(-1)[:, None]
    logits, expected = engine.decode(state, tokens), reference.decode(twin, tokens)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    for layer, length in enumerate(state.lengths):  # the new rows, appended at each layer's own slot
        torch.testing.assert_close(state.keys[layer][:length], twin.keys[layer][:length], atol=1e-4, rtol=0)
        torch.testing.assert_close(state.values[layer][:length], twin.values[layer][:length], atol=1e-4, rtol=0)
    assert state.lengths == twin.lengths and torch.equal(state.positions, twin.positions)


def test_onnx_generate_equals_the_export_backend(onnx_decode_engine):
    """Top-Kv + merge: a batch of three samples of different lengths and vision counts (two prefill
    groups, padded per-layer caches) generates the export backend's tokens, token for token."""
    model, engine, reference, _ = onnx_decode_engine
    g = torch.Generator().manual_seed(7)
    samples = [torch.randn(s, model.config.hidden_size, generator=g) for s in (26, 18, 26)]
    vision = [torch.arange(3, 19), torch.arange(2, 8), torch.arange(5, 21)]
    out = engine.generate(inputs_embeds=samples, vision_positions=vision, max_new_tokens=NEW)
    expected = reference.generate(inputs_embeds=samples, vision_positions=vision, max_new_tokens=NEW)
    assert [t.tolist() for t in out] == [t.tolist() for t in expected]
    assert all(len(set(t.tolist())) > 3 for t in out)  # the tokens vary: a real comparison


def test_onnx_decode_model_passes_the_checker(onnx_decode_engine):
    """decode.onnx (and the cached prefill's backbone.onnx) pass full checking; the cache inputs keep
    one dynamic length per layer, batch is shared."""
    *_, out = onnx_decode_engine
    for name in ("backbone.onnx", "decode.onnx"):
        onnx.checker.check_model(str(out / name), full_check=True)
    model = onnx.load(str(out / "decode.onnx"))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert [i.name for i in model.graph.input][:2] == ["inputs_embeds", "position_ids"]
    assert [dims[f"keys_{i}"][:2] for i in range(3)] == [["cache_0", "batch"], ["cache_1", "batch"],
                                                         ["cache_2", "batch"]]
    assert dims["masks_2"] == ["batch", "cache_2"]
    assert [o.name for o in model.graph.output] == ["logits", *(f"new_key_{i}" for i in range(3)),
                                                    *(f"new_value_{i}" for i in range(3))]
    backbone = onnx.load(str(out / "backbone.onnx"))
    assert [o.name for o in backbone.graph.output][:4] == ["logits", "kept_positions", "key_0", "value_0"]


@pytest.mark.parametrize("name", ["tiny-deepseek-v3", "tiny-deepseek-v2"])
def test_onnx_identity_config_in_process(name):
    """Kv == K through compile_model without out= (in-process ORT sessions), on deepseek_v3 and deepseek_v2
    (MLA caches of unequal key and value widths; v2's complex rotary as real pairs, in decode too):
    prefill equals the HF model, generate equals the export backend."""
    model = sharp_model(name, layers=2)  # layer 0 dense, layer 1 MoE
    config = FastMMoEConfig(reduce_from_layer=1, vision_expert_ratio=1.0)
    engine = compile_model(model, config, backend="onnx", quiet=True)
    embeds, positions = _inputs(model, 2, 24, range(2, 20))
    result = engine.prefill(inputs_embeds=embeds, vision_positions=positions)
    torch.testing.assert_close(result.logits, hf_last_logits(model, embeds), atol=1e-4, rtol=0)
    prompts, vision = [ids_of(12, 1), ids_of(9, 2)], [torch.arange(2, 8), None]
    out = engine.generate(prompts, vision_positions=vision, max_new_tokens=NEW)
    expected = export_engine(model, config, name + "-identity").generate(prompts, vision_positions=vision,
                                                                         max_new_tokens=NEW)
    assert [t.tolist() for t in out] == [t.tolist() for t in expected]


def test_onnx_engine_without_decode(onnx_engines):
    """decode=False: prefill-only (no decode.onnx, no cache outputs); generate says what to do."""
    _, _, out = onnx_engines["qwen3-topkv"]
    engine = load_engine(out)
    assert "decode" not in engine.manifest["programs"] and not (out / "decode.onnx").exists()
    assert engine.prefill(ids_of(6, 0)[None]).cache is None
    with pytest.raises(DecodeUnavailableError, match="no decode program"):
        engine.generate(ids_of(6, 0), max_new_tokens=4)


def test_unsupported_onnx_inputs_fail_cleanly(tmp_path, capsys):
    assert main(["tiny-qwen3-moe", "--out", str(tmp_path / "trt"), "--backend", "tensorrt", "--quiet"]) == 2
    assert "CUDA GPU" in capsys.readouterr().err and not (tmp_path / "trt").exists()
    _, program, _ = rewrite(tiny_model("tiny-qwen3-moe"), FastMMoEConfig())
    for name, t in program.state_dict.items():
        if t.is_floating_point():
            program.state_dict[name] = t.to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        export_onnx(program, tmp_path / "x.onnx")
    class Exp(torch.nn.Module):  # a complex op the real-pair translation does not know
        def forward(self, x):
            return torch.view_as_real(torch.view_as_complex(x).exp())

    program = torch.export.export(Exp(), (torch.randn(3, 2),))
    with pytest.raises(NotImplementedError, match="complex-valued op aten.exp"):
        export_onnx(program, tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


def test_onnx_engine_with_rope_positions_and_deepstack():
    """Qwen3-VL-MoE's backbone takes two more inputs (3D rotary positions, deepstack features):
    an ORT engine with Top-Kv + a merge before the last deepstack layer gives the export
    backend's logits and kept tokens for an image prompt. (Prefill only: decode steps take text
    tokens at plain positions, the decode program every family shares, tested above.)"""
    import numpy as np
    from PIL import Image

    loaded = tiny_model("tiny-qwen3-vl-moe")
    config = FastMMoEConfig(reduce_from_layer=1, vision_expert_ratio=0.5, merge_layers=(1,), keep_ratio=0.5)
    reference = compile_model(loaded, config, backend="export", quiet=True, decode=False)
    engine = compile_model(loaded, config, backend="onnx", quiet=True, decode=False)
    image = Image.fromarray((np.random.RandomState(0).rand(40, 48, 3) * 255).astype("uint8"))
    inputs = reference.prepare([image], "<image> What is it?").backbone_inputs()
    assert set(inputs) == {"inputs_embeds", "vision_positions", "rope_positions", "deepstack"}
    ours, theirs = engine.prefill(**inputs), reference.prefill(**inputs)
    assert torch.equal(ours.kept_positions, theirs.kept_positions)
    assert ours.kept_positions.shape[1] < inputs["inputs_embeds"].shape[1]  # the merge ran
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    assert torch.equal(ours.next_positions, theirs.next_positions)

