"""The authors' literal settings and the `authors_compat` option (docs/fastmmoe.md 2.11 and section 3):
what differs from the default semantics, pinned on small hand-computed cases in the batched kernel
(algorithm.merge_stage) and in an exported engine against the eager reference."""
import pytest
import torch

from fastmmoe_compile import FastMMoEConfig, algorithm
from fastmmoe_compile.api import rewrite
from fastmmoe_compile.config import config_preset

from .conftest import prompt, tiny_model
from .reference import eager_fastmmoe

Q = algorithm.RATIO_SCALE


def stage(hidden, probs, attn, vision, ratio, merge_ratio, window, strategy, method="mean", compat=False):
    return algorithm.merge_stage(hidden, probs, attn, vision, ratio_q=round(ratio * Q), merge_ratio_q=round(merge_ratio * Q),
                                 window=window, alpha=0.5, strategy=strategy, method=method, compat=compat)


def case(vectors, text_after: int = 1):
    """One sample: len(vectors) vision tokens first (routing vectors as given), then text tokens;
    hidden state of token i = [i, 1] so merged means can be read off."""
    n = len(vectors)
    seq = n + text_after
    hidden = torch.stack([torch.tensor([float(i), 1.0]) for i in range(seq)])[None]
    probs = torch.zeros(1, seq, len(vectors[0]))
    probs[0, :n] = torch.tensor(vectors)
    attn = torch.full((1, seq), 0.1)
    return hidden, probs, attn, torch.arange(n)[None]


def test_presets_use_the_authors_literal_stage_ratios():
    for name in ("internvl3.5-30b-a3b", "deepseek-vl2-small"):
        c = config_preset(name)  # 75 %: the authors' scripts write 0.91 per stage
        assert c.stage_ratios == (0.91, 0.91, 0.91) and [s.ratio for s in c.stages()] == [0.91] * 3
        assert c.authors_compat is False  # the default stays ours
        half = config_preset(name, keep_ratio=0.5)  # no literal published: keep_ratio ** (1/3)
        assert half.stage_ratios is None and half.stages()[0].ratio == pytest.approx(0.5 ** (1 / 3))
        assert config_preset(name, stage_ratios=(0.8, 0.8, 0.8)).stage_ratios == (0.8, 0.8, 0.8)
    # 1024 tokens at 0.91: 931 -> 847 -> 770 (0.9086 would give 930 -> 845 -> 767).
    assert [s.vision_after(n) for s, n in zip(config_preset("deepseek-vl2-small").stages(), (1024, 931, 847))] \
        == [931, 847, 770]


def test_stage_with_no_merged_window_is_skipped():
    """N = 10, r = 0.9: T = 9, floor(T * 0.05) = 0. Ours prunes to 9; the authors' code skips the stage."""
    args = case([[1.0, 0.0]] * 10), 0.9, 0.05, 3, "attention"
    hidden, probs, attn, vision = args[0]
    keep, new_hidden, new_vision = stage(hidden, probs, attn, vision, *args[1:])
    assert new_vision.shape == (1, 9) and keep.shape == (1, 10)
    keep, new_hidden, new_vision = stage(hidden, probs, attn, vision, *args[1:], compat=True)
    assert keep.tolist() == [list(range(11))] and torch.equal(new_hidden, hidden)
    assert algorithm.compat_vision_after_stage(10, round(0.9 * Q), round(0.05 * Q), 3) == 10


def test_final_count_is_t_minus_floor_t_mr_plus_m():
    """N = 8, W = 4, r = 0.75, mr = 0.5: T = 6, floor(T*mr) = 3, G = 2, M' = min(3, 1) = 1.
    Ours: M = 0 (merging a window of 4 would leave fewer than T), so 6 tokens.
    Authors: T - 3 + 1 = 4 tokens: window 0 (identical routing vectors) merged, 3 of window 1 kept
    by routing norm (token 6 has the smallest norm and goes)."""
    vectors = [[1.0, 0.0]] * 4 + [[0.0, 1.0], [0.6, 0.0], [0.0, 0.5], [0.9, 0.1]]
    hidden, probs, attn, vision = case(vectors)
    keep, _, new_vision = stage(hidden, probs, attn, vision, 0.75, 0.5, 4, "routing")
    assert keep.tolist() == [[0, 1, 2, 3, 4, 7, 8]]  # the 6 largest norms (5 and 6 go), no merge
    keep, new_hidden, new_vision = stage(hidden, probs, attn, vision, 0.75, 0.5, 4, "routing", compat=True)
    assert keep.tolist() == [[0, 4, 5, 7, 8]] and new_vision.tolist() == [[0, 1, 2, 3]]
    torch.testing.assert_close(new_hidden[0, 0], torch.tensor([1.5, 1.0]))  # mean of tokens 0..3
    assert algorithm.compat_vision_after_stage(8, round(0.75 * Q), round(0.5 * Q), 4) == 4


def test_partial_window_is_padded_with_the_mean_routing_vector():
    """N = 5, W = 3: windows {0,1,2} and {3,4}; r = 0.6, mr = 0.5: T = 3, M = 1 in both semantics.
    p = [1,0], [1,0], [.9,.1] | [0,1], [0,1].
    Ours: window 1's centre is [0,1], redundancy 1 > window 0's 0.9986: window 1 merges.
    Authors: window 1 is padded with the mean of all five, [.58,.42]; its centre [.193,.807] gives
    redundancy 0.9725 < 0.9986: window 0 merges."""
    hidden, probs, attn, vision = case([[1.0, 0.0], [1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.0, 1.0]])
    keep, new_hidden, _ = stage(hidden, probs, attn, vision, 0.6, 0.5, 3, "routing")
    assert keep.tolist() == [[0, 1, 3, 5]]  # merged {3,4} at 3; tokens 0, 1 kept by norm (2 goes)
    torch.testing.assert_close(new_hidden[0, 2], torch.tensor([3.5, 1.0]))
    keep, new_hidden, _ = stage(hidden, probs, attn, vision, 0.6, 0.5, 3, "routing", compat=True)
    assert keep.tolist() == [[0, 3, 4, 5]]  # merged {0,1,2} at 0; tokens 3, 4 kept
    torch.testing.assert_close(new_hidden[0, 0], torch.tensor([1.0, 1.0]))


def test_compat_batch_equals_each_sample_alone():
    g = torch.Generator().manual_seed(0)
    hidden, probs, attn = torch.randn(2, 30, 8, generator=g), torch.rand(2, 30, 6, generator=g), torch.rand(2, 30, generator=g)
    vision = torch.arange(3, 26).expand(2, 23)
    together = stage(hidden, probs, attn, vision, 0.7, 0.3, 3, "hybrid", "mlerp", compat=True)
    for b in range(2):
        alone = stage(hidden[b:b + 1], probs[b:b + 1], attn[b:b + 1], vision[b:b + 1], 0.7, 0.3, 3, "hybrid", "mlerp",
                      compat=True)
        for x, y in zip(together, alone):
            torch.testing.assert_close(x[b:b + 1], y)


# The compat count is an unbacked size in the graph (ops.merge_tokens' fake): shape propagation stays
# cheap however many stages there are (its exact floor-division expression grew ~60x a stage).
COMPAT = FastMMoEConfig(reduce_from_layer=1, merge_layers=(1, 2, 3), stage_ratios=(0.91, 0.4, 0.91), merge_ratio=0.05,
                        window=3, alpha=0.5, authors_compat=True)
COMPAT_STAGES = {layer: (ratio, 0.05, 3, 0.5, "hybrid", "mlerp", True)
                 for layer, ratio in zip(COMPAT.merge_layers, COMPAT.stage_ratios)}


def compat_prompt(hidden: int):
    """44 vision tokens, W = 3 (the last window is partial, so the padding counts), merge_ratio 0.05.
    Stage 1, r = 0.91: T = 40, floor(40*0.05) = 2 merged windows, 40 left in both semantics.
    Stage 2, r = 0.4: T = 16, floor(16*0.05) = 0: the authors skip it (40 left); ours prunes to 16.
    Stage 3, r = 0.91: T = 36, floor(36*0.05) = 1 merged window: 36 left."""
    embeds, mask = prompt(2, 52, slice(4, 48), hidden, seed=3)
    return embeds, mask, mask.nonzero()[:, 1].reshape(2, -1)


def test_compat_program_matches_eager_reference():
    """Three stages (one the authors skip) through the exported program against the eager reference in
    compat mode (logits 1e-4, same kept tokens); the default semantics keep fewer tokens."""
    loaded = tiny_model("tiny-qwen3-moe")
    _, program, _ = rewrite(loaded, COMPAT)
    embeds, mask, positions = compat_prompt(loaded.config.hidden_size)
    with torch.no_grad():
        logits, kept = program.module()(embeds, positions)
    kv = COMPAT.kv(loaded.family.top_k(loaded.config))
    ref_logits, ref_kept = eager_fastmmoe(loaded.lm, embeds, mask, 1, kv, COMPAT_STAGES)
    assert kept.tolist() == ref_kept
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    assert kept.shape[1] == 8 + 36
    _, default_program, _ = rewrite(loaded, FastMMoEConfig(**{**COMPAT.to_dict(), "authors_compat": False}))
    with torch.no_grad():
        assert default_program.module()(embeds, positions)[1].shape[1] < 8 + 36


def test_compat_export_engine_saves_and_loads(tmp_path):
    """The `export` backend writes the compat program and loads it back (its unbacked token counts are in
    the saved range constraints: before, torch.export.load failed with KeyError: u1): same kept tokens and
    logits as the program in memory."""
    from fastmmoe_compile import compile_model, load_engine

    loaded = tiny_model("tiny-qwen3-moe")
    first = compile_model(loaded, COMPAT, tmp_path / "engine", backend="export", quiet=True, decode=False)
    embeds, _, positions = compat_prompt(loaded.config.hidden_size)
    got = load_engine(tmp_path / "engine").prefill(inputs_embeds=embeds, vision_positions=positions)
    want = first.prefill(inputs_embeds=embeds, vision_positions=positions)
    assert torch.equal(got.kept_positions, want.kept_positions) and got.kept_positions.shape[1] == 8 + 36
    torch.testing.assert_close(got.logits, want.logits, atol=1e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.aoti("compat mode's unbacked token counts through Inductor's codegen, saved and loaded")
def test_compat_aoti_engine_prefills_and_generates_as_the_eager_reference(tmp_path):
    """The AOTInductor engine of the same three compat stages, saved and loaded: prefill logits and kept
    tokens equal the eager reference; greedy generate equals eager greedy decoding after that prefill."""
    from fastmmoe_compile import compile_model, load_engine

    from .reference import eager_generate
    from .test_decode import sharp_model

    loaded = sharp_model("tiny-qwen3-moe")
    compile_model(loaded, COMPAT, tmp_path / "engine", backend="inductor", quiet=True)
    eng = load_engine(tmp_path / "engine")
    assert eng.manifest["config"]["authors_compat"] is True
    embeds, mask, positions = compat_prompt(loaded.config.hidden_size)
    kv = COMPAT.kv(loaded.family.top_k(loaded.config))
    out = eng.prefill(inputs_embeds=embeds, vision_positions=positions)
    ref_logits, ref_kept = eager_fastmmoe(loaded.lm, embeds, mask, 1, kv, COMPAT_STAGES)
    assert out.kept_positions.tolist() == ref_kept
    torch.testing.assert_close(out.logits, ref_logits, atol=1e-4, rtol=0)
    tokens = eng.generate(inputs_embeds=embeds, vision_positions=positions, max_new_tokens=8)
    assert [t.tolist() for t in tokens] == eager_generate(loaded.lm, embeds, mask, 1, kv, COMPAT_STAGES, 8)


@pytest.mark.parametrize("strategy,method", [("hybrid", "mlerp"), ("routing", "mean"), ("attention", "mlerp")])
def test_compat_kernel_matches_the_reference_on_random_stages(strategy, method):
    """algorithm.merge_stage(compat=True) against the plain-Python reference_stage(compat=True), over
    vision counts, windows and ratios where stages are skipped, partial windows merge and the
    min(T - floor(T*mr), N - M'W) bound binds."""
    from .reference import reference_stage

    g = torch.Generator().manual_seed(1)
    for trial in range(24):
        n = int(torch.randint(1, 40, (1,), generator=g))
        window = 2 + trial % 3
        ratio, merge_ratio = [0.91, 0.6, 0.3][trial % 3], [0.05, 0.3, 0.9][(trial // 3) % 3]
        seq = n + 6
        hidden, probs = torch.randn(1, seq, 8, generator=g), torch.rand(1, seq, 5, generator=g).softmax(-1)
        attn = torch.rand(1, seq, generator=g)
        vision = torch.arange(3, 3 + n)[None]
        flags = [3 <= i < 3 + n for i in range(seq)]
        keep, new_hidden, _ = stage(hidden, probs, attn, vision, ratio, merge_ratio, window, strategy, method,
                                    compat=True)
        ref_keep, ref_hidden, _ = reference_stage(hidden[0], probs[0], attn[0], flags, ratio, merge_ratio, window, 0.5,
                                                  strategy, method, compat=True)
        assert keep[0].tolist() == ref_keep, (trial, n, window, ratio, merge_ratio)
        torch.testing.assert_close(new_hidden[0], ref_hidden, atol=1e-5, rtol=1e-5)


def test_onnx_backend_refuses_compat_before_any_work(tmp_path):
    from fastmmoe_compile import compile_model
    from fastmmoe_compile.lower.backends import BackendError

    with pytest.raises(BackendError, match="--authors-compat is not supported by --backend onnx"):
        compile_model("tiny-qwen3-moe", COMPAT, tmp_path / "engine", backend="onnx", quiet=True)
    assert not (tmp_path / "engine").exists()
