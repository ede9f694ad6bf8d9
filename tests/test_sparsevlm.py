"""The SparseVLM baseline (docs/fastmmoe.md 5.2): the exported program against the independent eager
reference (tests/sparsevlm_reference.py) on two families at batch 1 and 2, its FLOPs (analytic ==
measured), its counts, and the loop-free kernel's edge cases."""
import pytest
import torch

from fastmmoe_compile import ConfigError, SparseVLMConfig, algorithm, flops
from fastmmoe_compile.api import rewrite
from fastmmoe_compile.sparsevlm_math import sparsevlm_stage, stage_counts

from .conftest import hf_last_logits, prompt, tiny_model
from .sparsevlm_reference import eager_sparsevlm

SEQ, VISION = slice(5, 37), 32  # 5 text tokens, 32 vision tokens, 7 text tokens (the question)
CONFIG = SparseVLMConfig(prune_layers=(1, 3), keep_ratio=0.25)


@pytest.fixture(scope="module", params=["tiny-qwen3-moe", "tiny-deepseek-v2"])
def rewritten(request):
    loaded = tiny_model(request.param)
    _, program, record = rewrite(loaded, CONFIG)
    return loaded, program, record


@pytest.mark.parametrize("batch", [1, 2])
def test_matches_eager_reference(rewritten, batch):
    loaded, program, record = rewritten
    assert [p["pass"] for p in record.passes] == ["sparsevlm"]
    embeds, mask = prompt(batch, 44, SEQ, loaded.config.hidden_size, seed=7 + batch)
    positions = mask.nonzero()[:, 1].reshape(batch, -1)
    with torch.no_grad():
        logits, kept = program.module()(embeds, positions)
    stages = {s.layer: (s.ratio, s.recycle_ratio, s.cluster_ratio) for s in CONFIG.stages()}
    ref_logits, ref_kept = eager_sparsevlm(loaded.lm, embeds, mask, stages)
    assert kept.tolist() == ref_kept
    assert kept.shape == (batch, 12 + 8)  # 32 vision tokens -> 16 -> 8 (r = 0.5 per stage)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    assert (logits - hf_last_logits(loaded, embeds)).abs().max() > 20 * 1e-4  # it did change something


def test_flops_analytic_equals_measured(rewritten):
    loaded, program, _ = rewritten
    embeds, mask = prompt(1, 44, SEQ, loaded.config.hidden_size, seed=1)
    measured, per_op = flops.measured_flops(program, embeds, mask.nonzero()[:, 1][None])
    analytic = flops.analytic_flops(loaded, CONFIG, 12, VISION)
    assert {"fastmmoe.sparsevlm_raters", "fastmmoe.rater_attention", "fastmmoe.sparsevlm_tokens"} <= set(per_op)
    assert measured == pytest.approx(analytic.total, rel=0.02)
    rows = {r.layer: r for r in analytic.layers}
    assert [r.vision for r in analytic.layers][:5] == [32, 32, 16, 16, 8][:len(analytic.layers)]
    assert rows[1].merge > rows[3].merge > 0 and rows[0].merge == 0  # the raters are chosen at the first stage
    assert analytic.total < flops.analytic_flops(loaded, None, 12, VISION).total


def test_counts_follow_the_authors_recycling():
    """576 tokens kept at 300 (the authors' first LLaVA stage): D = 276 deleted net, the top
    floor(0.3 * D') + 1 of the deleted are recycled into C clusters, C = floor((floor(0.3*276)+1)/10)+1 = 9."""
    q = algorithm.RATIO_SCALE
    t, k, c, r = (int(x) for x in stage_counts(torch.tensor(576), 300 * q // 576 + 1, 300_000, 100_000))
    assert (t, c, k) == (300, 9, 291) and r == (576 - 291) * 3 // 10 + 1
    assert [int(x) for x in stage_counts(torch.tensor(5), q, 300_000, 100_000)] == [5, 5, 0, 0]  # r = 1: nothing


def test_kernel_recycles_into_cluster_means_at_centre_positions():
    """Two tight groups of deleted tokens become two tokens, each the mean of its group at the position
    of its densest member; the best-rated tokens stay as they are."""
    n, width = 12, 4
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, n + 1, width, generator=g)
    hidden[0, 4:8] = torch.tensor([5.0, 0, 0, 0]) + 0.01 * torch.randn(4, width, generator=g)
    hidden[0, 8:12] = torch.tensor([0, -5.0, 0, 0]) + 0.01 * torch.randn(4, width, generator=g)
    scores = torch.linspace(1.0, 0.0, n + 1)[None]  # tokens 0.. rated best first
    vision = torch.arange(n)[None]
    # r = 0.5, recycle 1.0, cluster 0.25: T = 6, D = 6, C = floor((6 + 1) * 0.25) + 1 = 2, K = 4 (tokens
    # 0..3); every one of the 8 deleted tokens is recycled, into 2 clusters.
    keep, new_hidden, new_vision = sparsevlm_stage(hidden, scores, vision, 500_000, 1_000_000, 250_000)
    assert keep.shape == (1, 7) and new_vision.tolist() == [[0, 1, 2, 3, 4, 5]]
    assert keep[0, :4].tolist() == [0, 1, 2, 3] and keep[0, -1] == 12
    centres = keep[0, 4:6].tolist()
    assert 4 <= centres[0] < 8 <= centres[1] < 12
    torch.testing.assert_close(new_hidden[0, 4], hidden[0, 4:8].mean(0))
    torch.testing.assert_close(new_hidden[0, 5], hidden[0, 8:12].mean(0))
    torch.testing.assert_close(new_hidden[0, :4], hidden[0, :4])


def test_kernel_edge_cases():
    hidden, scores = torch.randn(2, 9, 4), torch.rand(2, 9)
    none = torch.zeros(2, 0, dtype=torch.int64)  # no vision tokens: nothing to do
    keep, out, vision = sparsevlm_stage(hidden, scores, none, 500_000, 300_000, 100_000)
    assert keep.tolist() == [list(range(9))] * 2 and torch.equal(out, hidden) and vision.shape == (2, 0)
    one = torch.tensor([[3], [3]])  # T = max(1, .) = 1 = N: unchanged
    keep, out, _ = sparsevlm_stage(hidden, scores, one, 500_000, 300_000, 100_000)
    assert torch.equal(out, hidden)


def test_bench_rows_beside_fastmmoe_and_fastv():
    from fastmmoe_compile import bench

    args = bench.parse_args(["--variants", "fastmmoe,fastv,sparsevlm"])
    rows = bench.variant_configs(args, 48)  # InternVL3.5-30B-A3B's 48 layers
    assert {f"{m}-{t}" for m in ("fastmmoe", "fastv", "sparsevlm") for t in (75, 50, 25)} <= set(rows)
    assert rows["sparsevlm-50"] == SparseVLMConfig(prune_layers=(2, 6, 15), keep_ratio=0.5)
    assert bench.variant_configs(args, 4)["sparsevlm-25"].prune_layers == (2,)  # the paper's layers it has


def test_config_errors():
    with pytest.raises(ConfigError, match="strictly increasing"):
        SparseVLMConfig(prune_layers=(3, 1))
    with pytest.raises(ConfigError, match="keep_ratio"):
        SparseVLMConfig(keep_ratio=0)
    with pytest.raises(ConfigError, match="out of range"):
        SparseVLMConfig().check_model(4, 2)  # the paper's 2, 6, 15 need 16 layers
    assert [round(s.ratio, 6) for s in SparseVLMConfig(keep_ratio=0.125).stages()] == [0.5, 0.5, 0.5]


@pytest.mark.slow
@pytest.mark.onnx("sparsevlm_tokens' loop-free ONNX kernel (ops.LOOP_FREE) exists only on this backend")
def test_onnx_backbone_matches_the_program(tmp_path):
    """sparsevlm_tokens decomposed into its loop-free kernel for ONNX (ops.LOOP_FREE): ONNX Runtime's
    logits within 1e-4 of the exported program and the same kept tokens, batch 1 and 2, no vision."""
    pytest.importorskip("onnxruntime")
    from fastmmoe_compile.lower.onnx import export_onnx
    from fastmmoe_compile.runtime.onnx_runtime import OrtBackbone

    loaded = tiny_model("tiny-qwen3-moe")
    _, program, _ = rewrite(loaded, CONFIG)
    export_onnx(program, tmp_path / "backbone.onnx")
    run = OrtBackbone(tmp_path / "backbone.onnx")
    for i, (batch, seq, vision) in enumerate([(1, 20, range(3, 11)), (2, 33, range(5, 30)), (2, 9, range(0))]):
        g = torch.Generator().manual_seed(i)
        embeds = torch.randn(batch, seq, loaded.config.hidden_size, generator=g)
        positions = torch.tensor(list(vision), dtype=torch.long).expand(batch, -1).contiguous()
        logits, kept = run(embeds, positions)[:2]
        with torch.no_grad():
            expected = program.module()(embeds, positions)
        torch.testing.assert_close(logits, expected[0], atol=1e-4, rtol=0)
        assert torch.equal(kept, expected[1])


def sparsevlm_generate_case(name: str):
    """A sharp tiny model (greedy tokens vary), a 44-token prompt at batch 2 (32 vision tokens), and the
    eager reference's prefill logits, kept tokens and greedy tokens after it."""
    from .reference import eager_greedy_decode
    from .test_decode import sharp_model

    loaded = sharp_model(name)
    embeds, mask = prompt(2, 44, SEQ, loaded.config.hidden_size, seed=11)
    embeds = embeds * 0.5
    stages = {s.layer: (s.ratio, s.recycle_ratio, s.cluster_ratio) for s in CONFIG.stages()}
    caches = []
    logits, kept = eager_sparsevlm(loaded.lm, embeds, mask, stages, caches=caches)
    tokens = eager_greedy_decode(loaded.lm, logits, caches, embeds.shape[1], 8)
    return loaded, embeds, mask.nonzero()[:, 1].reshape(2, -1), (logits, kept, tokens)


def check_engine_against_reference(eng, embeds, positions, reference):
    logits, kept, tokens = reference
    out = eng.prefill(inputs_embeds=embeds, vision_positions=positions)
    assert out.kept_positions.tolist() == kept
    torch.testing.assert_close(out.logits, logits, atol=1e-4, rtol=0)
    generated = eng.generate(inputs_embeds=embeds, vision_positions=positions, max_new_tokens=8)
    assert [t.tolist() for t in generated] == tokens
    assert len(set(tokens[0] + tokens[1])) > 2  # not one repeated token: positions and caches matter


def test_generate_equals_eager_greedy_decoding():
    """Decode after SparseVLM's prefill (export backend, deepseek-v2): every layer attends to its own
    cache (shorter after each stage), positions continue from the original prompt length; batch 2."""
    from fastmmoe_compile import compile_model

    loaded, embeds, positions, reference = sparsevlm_generate_case("tiny-deepseek-v2")
    check_engine_against_reference(compile_model(loaded, CONFIG, backend="export", quiet=True), embeds, positions,
                                   reference)


@pytest.mark.slow
@pytest.mark.aoti("SparseVLM's data-dependent token counts through Inductor's codegen, saved and loaded")
def test_aoti_engine_matches_eager_reference(tmp_path):
    """The AOTInductor engine (qwen3-moe), saved and loaded: prefill logits and kept tokens equal the eager
    reference, and so does greedy generate."""
    from fastmmoe_compile import compile_model, load_engine

    loaded, embeds, positions, reference = sparsevlm_generate_case("tiny-qwen3-moe")
    compile_model(loaded, CONFIG, tmp_path / "engine", backend="inductor", quiet=True)
    eng = load_engine(tmp_path / "engine")
    assert eng.manifest["config"]["method"] == "sparsevlm"
    check_engine_against_reference(eng, embeds, positions, reference)
