"""The merge stage as a per-sample loop (docs/fastmmoe.md 2.1-2.9), written plainly with host-side counts:
the reference that algorithm.merge_stage (the loop-free kernel every backend runs) is checked
against. It was the product's eager kernel before the loop-free form became the only one."""
from __future__ import annotations

import torch

from fastmmoe_compile.algorithm import (
    MAX_VISION_TOKENS, NORM_EPS, RATIO_SCALE, combine_scores, vision_after_stage,
)


def stage_target(num_vision: int, ratio_q: int) -> int:
    """T = max(1, floor(N * r)) (docs/fastmmoe.md 2.1), for concrete N."""
    return max(1, (num_vision * ratio_q) // RATIO_SCALE)


def merged_window_count(num_vision: int, target: int, merge_ratio_q: int, window: int) -> int:
    """M = min(floor(T * merge_ratio), G - 1), never more than leaves T tokens to keep.

    The last bound (N - M*(W-1) >= T) only bites at extreme merge ratios; docs/fastmmoe.md's
    formula alone could then ask to keep more tokens than remain.
    """
    windows = -(-num_vision // window)
    m = min((target * merge_ratio_q) // RATIO_SCALE, windows - 1)
    return max(0, min(m, (num_vision - target) // (window - 1)))


def window_scores(probs: torch.Tensor, attn: torch.Tensor, window: int, alpha: float, strategy: str):
    """Score c_g of each window of W consecutive vision tokens (docs/fastmmoe.md 2.4-2.6).

    probs [N, E] routing distributions, attn [N] last-token attention. Windows with
    fewer than two tokens get -inf: they are never merged."""
    n, e = probs.shape
    g = -(-n // window)
    pad = g * window - n
    valid = torch.ones(n, dtype=probs.dtype, device=probs.device)
    p = torch.nn.functional.pad(probs, (0, 0, 0, pad)).reshape(g, window, e)
    a = torch.nn.functional.pad(attn, (0, pad)).reshape(g, window)
    m = torch.nn.functional.pad(valid, (0, pad)).reshape(g, window)
    count = m.sum(dim=1)
    centre = (p * m[..., None]).sum(dim=1) / count[:, None]
    cos = torch.nn.functional.cosine_similarity(p, centre[:, None, :].expand_as(p), dim=-1, eps=1e-12)
    redundancy = (cos * m).sum(dim=1) / count
    attention = (a * m).sum(dim=1) / count
    attention = attention / attention.max().clamp_min(1e-30)
    score = combine_scores(redundancy, attention, strategy, alpha)
    return score.masked_fill(count < 2, float("-inf"))


def merge_vectors(x: torch.Tensor, method: str) -> torch.Tensor:
    """One token from a window's hidden states x [W, H]: MLERP or the plain mean."""
    mean = x.mean(dim=0)
    if method == "mean":
        return mean
    if method != "mlerp":
        raise ValueError(f"unknown merge method {method!r}")
    return mean / mean.norm().clamp_min(NORM_EPS) * x.norm(dim=-1).max()


def top_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, ties to the earlier index, in ascending order."""
    order = torch.sort(score, descending=True, stable=True).indices[:k]
    return order.sort().values


def merge_stage_loop(hidden, probs, attn, vision, *, ratio_q: int, merge_ratio_q: int, window: int, alpha: float,
                     strategy: str, method: str):
    """One sample, one stage (docs/fastmmoe.md 2.1-2.9).

    hidden [S, H] residual stream; probs [S, E] routing distributions; attn [S]
    last-token attention; vision [N] current vision positions (increasing).
    Returns keep [S'] (positions in the current sequence, a merged token at its
    window's first token), new hidden [S', H], and new vision positions [T'] in the
    reduced sequence."""
    seq = hidden.shape[0]
    n = vision.shape[0]
    if n > MAX_VISION_TOKENS:
        raise ValueError(f"more than {MAX_VISION_TOKENS} vision tokens in one sample")
    target, new_n = stage_target(n, ratio_q), vision_after_stage(n, ratio_q)
    if n <= target:
        return torch.arange(seq, device=hidden.device), hidden, vision
    p, a = probs[vision], attn[vision]
    m = merged_window_count(n, target, merge_ratio_q, window)
    merged_windows = top_indices(window_scores(p, a, window, alpha, strategy), m) if m else vision[:0]
    in_merged = torch.zeros(n, dtype=torch.bool, device=hidden.device)
    for g in merged_windows.tolist():
        in_merged[g * window:(g + 1) * window] = True
    importance = p.norm(dim=-1) if strategy == "routing" else a
    rest = (~in_merged).nonzero().flatten()
    kept_rest = rest[top_indices(importance[rest], target - m)]
    firsts = merged_windows * window
    survivors = torch.cat([kept_rest, firsts]).sort().values  # indices into vision, in order
    is_text = torch.ones(seq, dtype=torch.bool, device=hidden.device)
    is_text[vision] = False
    keep = torch.cat([is_text.nonzero().flatten(), vision[survivors]]).sort().values
    new_hidden = hidden[keep]
    slot = torch.searchsorted(keep, vision[firsts])
    for s, g in zip(slot.tolist(), merged_windows.tolist()):
        new_hidden[s] = merge_vectors(hidden[vision[g * window:(g + 1) * window]], method)
    new_vision = torch.searchsorted(keep, vision[survivors])
    assert new_vision.shape[0] == new_n
    return keep, new_hidden, new_vision


