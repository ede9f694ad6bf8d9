"""algorithm.merge_stage (the loop-free merge kernel every backend runs) selects the same tokens
and builds the same merged vectors as the per-sample loop of tests/merge_reference.py."""
import pytest
import torch

from fastmmoe_compile import algorithm as A

from .merge_reference import merge_stage_loop


@pytest.mark.parametrize("seed", range(4))
def test_batched_merge_stage_equals_merge_stage(seed):
    g = torch.Generator().manual_seed(seed)
    for trial in range(60):
        batch, seq = int(torch.randint(1, 4, (), generator=g)), int(torch.randint(2, 40, (), generator=g))
        n = int(torch.randint(0, seq + 1, (), generator=g))
        window = (2, 3, 4)[trial % 3]
        strategy = ("hybrid", "routing", "attention")[(trial // 3) % 3]
        method = ("mlerp", "mean")[trial % 2]
        ratio_q = A.ratio_units((0.5, 0.75, 0.25, 0.9, 1.0)[trial % 5])
        merge_q = A.ratio_units((0.025, 0.3, 0.6, 1.0)[trial % 4])  # high ratios: many merged windows
        hidden = torch.randn(batch, seq, 8, generator=g)
        probs = None if trial % 5 == 0 else torch.randn(batch, seq, 6, generator=g).softmax(-1)  # None: FastV
        attn = torch.rand(batch, seq, generator=g)
        if trial % 4 == 0:
            attn = attn.round(decimals=1)  # ties in importance and window attention
        vision = torch.stack([torch.randperm(seq, generator=g)[:n].sort().values for _ in range(batch)])
        settings = dict(ratio_q=ratio_q, merge_ratio_q=merge_q, window=window, alpha=0.5, strategy=strategy,
                        method=method)
        keep, new_hidden, new_vision = A.merge_stage(hidden, probs, attn, vision, **settings)
        p = attn[..., None] if probs is None else probs
        for b in range(batch):
            k, h, v = merge_stage_loop(hidden[b], p[b], attn[b], vision[b], **settings)
            assert torch.equal(keep[b], k) and torch.equal(new_vision[b], v), (trial, b)
            torch.testing.assert_close(new_hidden[b], h, atol=1e-5, rtol=1e-5)
