"""flops.py: the analytic count (docs/fastmmoe.md section 4) agrees with the count measured on the graph."""
from __future__ import annotations

import pytest
import torch

from fastmmoe_compile import flops
from fastmmoe_compile.api import rewrite
from fastmmoe_compile import algorithm
from fastmmoe_compile.config import FastMMoEConfig, FastVConfig, config_preset
from fastmmoe_compile.models import load_model

TEXT, VISION, PREFIX = 10, 40, 3
TOPKV = FastMMoEConfig(reduce_from_layer=1, vision_expert_ratio=0.5)
UNMODIFIED = FastMMoEConfig(vision_expert_ratio=1.0)  # Kv == K: the pass changes nothing


@pytest.fixture(scope="module", params=["tiny-qwen3-moe", "tiny-deepseek-v2"])
def tiny(request):
    return load_model(request.param)


def _inputs(loaded):
    embeds = torch.randn(1, TEXT + VISION, loaded.config.hidden_size, generator=torch.Generator().manual_seed(0))
    return embeds, torch.arange(PREFIX, PREFIX + VISION)[None]


@pytest.mark.parametrize("config", [None, TOPKV], ids=["baseline", "topkv"])
def test_analytic_matches_measured(tiny, config):
    _, program, _ = rewrite(tiny, config or UNMODIFIED)
    measured, per_op = flops.measured_flops(program, *_inputs(tiny))
    analytic = flops.analytic_flops(tiny, config, TEXT, VISION)
    assert "fastmmoe.grouped_mm" in per_op  # the expert GEMMs are counted, not skipped
    assert measured == pytest.approx(analytic.total, rel=0.02)


MERGE = FastMMoEConfig(reduce_from_layer=1, merge_layers=(1, 2), keep_ratio=0.25, merge_ratio=0.2)
FASTV = FastVConfig(prune_layer=1, keep_ratio=0.5)


@pytest.mark.parametrize("config", [MERGE, FASTV], ids=["merge", "fastv"])
def test_analytic_matches_measured_with_token_reduction(tiny, config):
    _, program, _ = rewrite(tiny, config)
    measured, per_op = flops.measured_flops(program, *_inputs(tiny))
    analytic = flops.analytic_flops(tiny, config, TEXT, VISION)
    # The schedule's final token count is the graph's (kept positions after the last stage).
    with torch.no_grad():
        _, kept = program.module()(*_inputs(tiny))
    assert kept.shape[1] == TEXT + flops.vision_schedule(config, len(analytic.layers), VISION)[-1][1] < TEXT + VISION
    assert analytic.by_part["merge"] > 0
    assert measured == pytest.approx(analytic.total, rel=0.02)
    assert analytic.total < flops.analytic_flops(tiny, None, TEXT, VISION).total


def test_fastv_and_merge_schedules():
    assert flops.vision_schedule(FASTV, 4, 40) == [(40, 40), (40, 20), (20, 20), (20, 20)]
    assert flops.vision_schedule(None, 3, 40) == [(40, 40)] * 3
    assert flops.vision_schedule(FastMMoEConfig(), 3, 40) == [(40, 40)] * 3  # no merge layers
    # The authors' InternVL settings at 50%: three stages of r = 0.5 ** (1/3), compounding
    # as the graph computes it (algorithm.vision_after_stage), never as a float product.
    cfg = config_preset("internvl3.5-30b-a3b", keep_ratio=0.5)
    sched = flops.vision_schedule(cfg, 16, 1024)
    q = algorithm.ratio_units(0.5 ** (1 / 3))
    n5 = algorithm.vision_after_stage(1024, q)
    n8 = algorithm.vision_after_stage(n5, q)
    n12 = algorithm.vision_after_stage(n8, q)
    assert (sched[5], sched[8], sched[12], sched[15]) == ((1024, n5), (n5, n8), (n8, n12), (n12, n12))
    assert n12 == 511  # floor at every stage: a little under 512


def test_fastv_costs_all_k_experts(tiny):
    """FastV keeps the model's K experts for the vision tokens it keeps (no Top-Kv)."""
    k = tiny.family.top_k(tiny.config)
    report = flops.analytic_flops(tiny, FASTV, TEXT, VISION)
    assert all(r.kv == r.k == k for r in report.layers if r.routed)
    assert [r.merge > 0 for r in report.layers] == [i == FASTV.prune_layer for i in range(len(report.layers))]
    cmp = flops.compare(tiny, FASTV, TEXT, VISION)
    assert cmp["ratio"] > 1


def test_topkv_saves_only_routed_vision_flops(tiny):
    base = flops.analytic_flops(tiny, None, TEXT, VISION)
    fast = flops.analytic_flops(tiny, TOPKV, TEXT, VISION)
    k = tiny.family.top_k(tiny.config)
    kv = TOPKV.kv(k)
    for b, f in zip(base.layers, fast.layers):
        assert (b.attn_proj, b.attn_core, b.router, b.dense) == (f.attn_proj, f.attn_core, f.router, f.dense)
        if b.routed and b.layer >= TOPKV.reduce_from_layer:
            per_pair = b.routed // ((TEXT + VISION) * k)
            assert b.routed - f.routed == VISION * (k - kv) * per_pair
        else:
            assert b.routed == f.routed
    # The identities of docs/fastmmoe.md section 1: no vision token, or Kv == K, costs the same as the model.
    assert flops.analytic_flops(tiny, TOPKV, TEXT, 0).total == flops.analytic_flops(tiny, None, TEXT, 0).total
    assert flops.analytic_flops(tiny, UNMODIFIED, TEXT, VISION).total == base.total


def test_merge_schedule_and_per_layer_counts(tiny):
    cfg = FastMMoEConfig(merge_layers=(1, 2), stage_ratios=(0.5, 0.5))
    assert flops.vision_schedule(cfg, 4, 40) == [(40, 40), (40, 20), (20, 10), (10, 10)]
    report = flops.analytic_flops(tiny, cfg, TEXT, 40)
    assert [r.tokens for r in report.layers] == [TEXT + 40, TEXT + 40, TEXT + 20, TEXT + 10]
    # Explicit per-layer counts give the same as the schedule they spell out.
    explicit = flops.analytic_flops(tiny, cfg, TEXT, [(40, 40), (40, 20), (20, 10), (10, 10)])
    assert explicit.total == report.total
    assert "| **total** |" in report.table()


def test_real_size_meta_presets_are_sensible():
    internvl = load_model("internvl3.5-30b-a3b-backbone")
    assert internvl.on_meta
    # ~3.3B active parameters per token (of which 0.3B lm_head): ~2 FLOPs per active parameter.
    per_token = flops.analytic_flops(internvl, None, 1, 0).total
    assert 2 * 2.5e9 < per_token < 2 * 4e9
    prefill = flops.analytic_flops(internvl, None, 64, 1024)
    assert 5e12 < prefill.total < 9e12  # ~6.9 TFLOPs for 1088 tokens
    cmp = flops.compare(internvl, FastMMoEConfig(), 64, 1024)
    assert 1.25 < cmp["ratio"] < 1.45  # Top-Kv alone: routed experts are ~60% of the FLOPs

    dsvl2 = load_model("deepseek-vl2-small-backbone")  # MLA attention, shared experts, 1 dense layer
    report = flops.analytic_flops(dsvl2, None, 1, 0)
    assert 2 * 1.8e9 < report.total < 2 * 3.2e9  # ~2.4B active parameters
    assert report.layers[0].router == 0 and report.layers[0].dense > 0  # first_k_dense_replace=1
    assert report.layers[1].dense > 0  # the 2 shared experts
