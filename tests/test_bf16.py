"""bf16 engines on the CPU: the testable twin of the GPU's dtype path.

Tolerance (documented in README "Devices and dtypes"): bf16 keeps 8 significant bits (unit
roundoff 2^-8 = 0.4 %); through the tiny 4-layer model's attention, routing, grouped GEMMs and
merges the next-token logits of a bf16 engine stay within BF16_RTOL = 6 % of the largest fp32
logit (measured: 1.5 % with Top-Kv + merges, 2.9 % with FastV).
"""
import pytest
import torch

from fastmmoe_compile import ops
from fastmmoe_compile.api import compile_model, rewrite
from fastmmoe_compile.config import FastMMoEConfig, FastVConfig

BF16_RTOL = 0.06
CONFIGS = {"topkv+merges": FastMMoEConfig(reduce_from_layer=1, vision_expert_ratio=0.5, merge_layers=(1, 3),
                                          keep_ratio=0.5, merge_ratio=0.2),
           "fastv": FastVConfig(prune_layer=1, keep_ratio=0.5)}
IDS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
VISION = torch.arange(4, 28).expand(2, 24)


@pytest.fixture(scope="module", params=list(CONFIGS))
def engines(request):
    config = CONFIGS[request.param]
    return {dtype: compile_model("tiny-qwen3-moe", config, backend="export", quiet=True, dtype=dtype)
            for dtype in (torch.float32, torch.bfloat16)}


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_bf16_prefill_is_finite_and_close_to_fp32(engines):
    r16 = engines[torch.bfloat16].prefill(IDS, vision_positions=VISION)
    r32 = engines[torch.float32].prefill(IDS, vision_positions=VISION)
    assert r16.logits.dtype == torch.bfloat16 and torch.isfinite(r16.logits).all()
    assert r16.kept_positions.shape == r32.kept_positions.shape
    assert all(k.dtype == torch.bfloat16 for pair in r16.cache for k in pair)
    assert _close(r16.logits, r32.logits) <= BF16_RTOL


def test_bf16_decode_and_generate(engines):
    e16, e32 = engines[torch.bfloat16], engines[torch.float32]
    r16, r32 = e16.prefill(IDS, vision_positions=VISION), e32.prefill(IDS, vision_positions=VISION)
    token = r32.logits.argmax(-1)[:, None]  # the same token into both
    s16, s32 = e16.start_decode(r16, 3), e32.start_decode(r32, 3)
    for _ in range(3):
        l16, l32 = e16.decode(s16, token), e32.decode(s32, token)
        assert torch.isfinite(l16).all() and _close(l16, l32) <= BF16_RTOL
        token = l32.argmax(-1)[:, None]
    out = e16.generate(IDS, vision_positions=VISION, max_new_tokens=4)
    assert [t.shape for t in out] == [torch.Size([4])] * 2


def _separated_case(dtype, routing: bool):
    """3 windows of 3 vision tokens per sample with far-apart attention; with routing, windows 0
    and 2 route identically (redundant), window 1 to three different experts."""
    batch, seq, width, experts = 2, 16, 8, 4
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(batch, seq, width, generator=g)
    attn = torch.rand(batch, seq, generator=g) * 0.1
    vision = torch.arange(3, 12).expand(batch, 9).contiguous()
    attn[:, 3:12] = torch.tensor([0.9, 0.2, 0.6, 0.3, 0.8, 0.1, 0.7, 0.4, 0.5])  # well separated (bf16 step 0.004)
    probs = None
    if routing:
        probs = torch.full((batch, seq, experts), 0.01)
        probs[:, 3:6, 0] = probs[:, 9:12, 1] = 0.97
        probs[:, 6, 1] = probs[:, 7, 2] = probs[:, 8, 3] = 0.97
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(hidden), (None if probs is None else probs), attn, vision


@pytest.mark.parametrize("strategy,routing", [("hybrid", True), ("attention", True), ("attention", False)])
def test_bf16_keeps_the_same_tokens_when_scores_are_well_separated(strategy, routing):
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        hidden, probs, attn, vision = _separated_case(dtype, routing)
        outs[dtype] = torch.ops.fastmmoe.merge_tokens(hidden, probs, attn, vision, 500000, 340000, 3, 0.5,
                                                      strategy, "mlerp")
    (k32, h32, v32), (k16, h16, v16) = outs[torch.float32], outs[torch.bfloat16]
    assert torch.equal(k16, k32) and torch.equal(v16, v32)
    assert h16.dtype == torch.bfloat16 and _close(h16, h32) <= 0.01


def test_grouped_mm_rows_past_the_last_offset_never_reach_the_result(monkeypatch):
    """Native torch._grouped_mm leaves output rows past offs[-1] uninitialised. Dirty them (NaN,
    as a reused allocation may hold) and check the bf16 Top-Kv prefill is bit-identical and finite:
    the dispatch gives every grouped GEMM exactly offs[-1] rows, so no such row exists or is read."""
    loaded, program, _ = rewrite("tiny-qwen3-moe", CONFIGS["topkv+merges"], dtype=torch.bfloat16)
    embeds = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    gm = program.module()
    clean = gm(embeds, VISION)
    real, calls = torch._grouped_mm, []

    def dirty(x, w, offs=None, **kw):
        out = real(x, w, offs=offs, **kw)
        end = int(offs[-1])
        calls.append((x.shape[0], end))
        padded = torch.full((x.shape[0] + 5, out.shape[1]), float("nan"), dtype=out.dtype)  # a dirty allocation
        padded[:end] = out[:end]
        return padded[:x.shape[0]]

    monkeypatch.setattr(torch, "_grouped_mm", dirty)
    assert ops._native_grouped_mm_ok(embeds[0], torch.zeros(2, 64, 4, dtype=torch.bfloat16))
    dirtied = gm(embeds, VISION)
    assert calls and all(rows == end for rows, end in calls), calls  # no row past the last offset
    assert torch.isfinite(dirtied[0]).all()
    assert torch.equal(dirtied[0], clean[0]) and torch.equal(dirtied[1], clean[1])
