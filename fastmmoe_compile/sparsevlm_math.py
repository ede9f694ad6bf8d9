"""The math of the SparseVLM baseline (Zhang et al., "SparseVLM: Visual Token Sparsification for
Efficient Vision-Language Model Inference", arXiv 2410.04417, ICML 2025; docs/fastmmoe.md section 5.2).

Three loop-free kernels, aten-traceable like algorithm.merge_stage (no host syncs, no data-dependent
sizes; every count that depends on data is a 0-d tensor, every shape a function of S and N):
  - rater_flags: the text "raters" (paper 3.2), chosen once from the input embeddings;
  - rater_attention: each token's attention from the raters at a layer (paper 3.2, the rating);
  - sparsevlm_stage: keep the best-rated vision tokens and recycle part of the deleted ones into
    a few aggregated tokens (paper 3.3 and 3.4).
tests/sparsevlm_reference.py is the independent per-sample loop they are checked against.
"""
from __future__ import annotations

import torch

from .algorithm import (RATIO_SCALE, head_mean_attention, keep_survivors, new_vision_positions, vision_after_stage,
                        vision_count)


def rater_flags(embeds: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
    """[B, S] float32, 1.0 at the raters: embeds [B, S, H] (the backbone's input embeddings), vision [B, N].

    Paper 3.2 / the authors' code (Gumpest/SparseVLMs, modelling_sparse_llama.py): the relevance of
    text token t is mean over vision tokens v of softmax_t(e_v . e_t) (unscaled dot products, softmax
    over the text tokens); the raters are the text tokens whose relevance is above the mean relevance.
    Text tokens here are the non-vision tokens after the first vision token (the authors' question
    span after the image). Our choice: with no token above the mean (all equal), every such text
    token rates; with no vision or no such text token, nobody does (the stage then has nothing to do
    or rates by a zero score)."""
    batch, seq, hidden = embeds.shape
    positions = torch.arange(seq, device=embeds.device).expand(batch, seq)
    is_vision = torch.zeros(batch, seq, dtype=torch.bool, device=embeds.device).scatter(
        1, vision, torch.ones_like(vision, dtype=torch.bool))
    first = torch.cat([vision, torch.full_like(positions[:, :1], seq)], 1)[:, :1]  # S when N is 0
    candidate = ~is_vision & (positions > first)
    v = torch.gather(embeds, 1, vision[..., None].expand(batch, vision.shape[1], hidden))
    logits = torch.matmul(v, embeds.transpose(1, 2)).float()  # [B, N, S]
    logits = logits.masked_fill(~candidate[:, None, :], float("-inf"))
    relevance = torch.where(candidate, logits.softmax(dim=-1).mean(dim=1), 0.0)  # NaN rows (no text) dropped
    mean = relevance.sum(dim=1, keepdim=True) / candidate.sum(dim=1, keepdim=True).clamp_min(1)
    raters = candidate & (relevance > mean)
    raters = raters | (candidate & ~raters.any(dim=1, keepdim=True))  # (no bool Where: ONNX Runtime has none)
    return raters.float()


def rater_attention(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
                    raters: torch.Tensor) -> torch.Tensor:
    """[B, S] float32: every key's attention probability from the raters, averaged over heads and raters.

    q [B, Hq, S, D], k [B, Hkv, S, D] (grouped-query heads repeat), mask broadcastable to [B, Hq, S, S]
    (bool: True = attend; float: additive; None: causal), raters [B, S] (rater_flags, gathered with
    the sequence). Every query row is computed (their number is data-dependent); only rater rows count.
    The attention itself is algorithm.head_mean_attention, as for FastMMoE's last-token row."""
    if mask is None:
        seq = q.shape[2]
        mask = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    probs = head_mean_attention(q, k, mask, scale)  # [B, S(query), S(key)]
    weight = raters.float()
    return (probs * weight[:, :, None]).sum(dim=1) / weight.sum(dim=1, keepdim=True).clamp_min(1)


def stage_counts(n_t: torch.Tensor, ratio_q: int, recycle_q: int, cluster_q: int):
    """(T, K, C, R) as 0-d tensors for N = n_t vision tokens (docs/fastmmoe.md 5.2):
    T = min(N, max(1, floor(N*r))) tokens leave the stage: K kept as they are, C recycled aggregates;
    D = N - T; C = min(T, floor((floor(D*recycle) + 1) * cluster) + 1) when D > 0, else 0; K = T - C;
    of the N - K deleted tokens the R = floor((N - K)*recycle) + 1 best rated are recycled (0 if C is 0)."""
    t = torch.minimum(((n_t * ratio_q) // RATIO_SCALE).clamp_min(1), n_t)
    d = n_t - t
    c = ((d * recycle_q) // RATIO_SCALE + 1) * cluster_q // RATIO_SCALE + 1
    c = torch.where(d > 0, torch.minimum(c, t), 0)
    k = t - c
    r = torch.where(c > 0, ((n_t - k) * recycle_q) // RATIO_SCALE + 1, 0)
    return t, k, c, r


def sparsevlm_stage(hidden: torch.Tensor, scores: torch.Tensor, vision: torch.Tensor, ratio_q: int, recycle_q: int,
                    cluster_q: int):
    """One SparseVLM stage for every sample: hidden [B, S, H], scores [B, S] (rater_attention),
    vision [B, N] increasing positions -> (keep [B, S'], hidden [B, S', H], vision [B, N']) with
    N' = vision_after_stage(N, ratio_q), the fastmmoe::merge_tokens contract.

    The K best-rated vision tokens stay; the R best-rated of the deleted ones are clustered into C
    tokens (stage_counts) by density-peak clustering with k = C nearest neighbours (DPC-kNN, the
    authors' cluster_and_merge): distances |x_i - x_j| / sqrt(H) among the recycled tokens, density
    exp(-mean of the squared distances to the C nearest, self included), parent distance = distance
    to the nearest denser token (the largest distance for the densest), centres = the C largest
    density * parent distance, every recycled token joins its nearest centre. A cluster becomes the
    mean of its members' hidden states, placed at its centre token's position (its position id).
    Ties go to the earlier token; of two equally dense tokens the earlier counts as the denser (the
    authors break density ties with random noise)."""
    batch, _, width = hidden.shape
    n = vision.shape[1]
    new_n = vision_after_stage(n, ratio_q)
    device = hidden.device
    n_t = vision_count(vision)
    _, k, c, r = stage_counts(n_t, ratio_q, recycle_q, cluster_q)
    index = torch.arange(n, device=device)

    s = torch.gather(scores.float(), 1, vision)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    rank = torch.zeros_like(order).scatter(1, order, index.expand(batch, n))
    kept = rank < k
    recycled = (rank >= k) & (rank < k + r)

    x = torch.gather(hidden, 1, vision[..., None].expand(batch, n, width))
    xf = x.float()
    sq = (xf * xf).sum(-1)
    gram = torch.matmul(xf, xf.transpose(1, 2))
    dist = (sq[:, :, None] + sq[:, None, :] - 2 * gram).clamp_min(0).sqrt() / width ** 0.5
    dist = dist.masked_fill(torch.eye(n, dtype=torch.bool, device=device), 0.0)  # exact 0 to itself
    pair = recycled[:, :, None] & recycled[:, None, :]
    inf = float("inf")
    nearest = torch.sort(torch.where(pair, dist, inf), dim=-1).values
    within = index < c
    density = torch.exp(-torch.where(within, nearest, 0.0).square().sum(-1) / c.clamp_min(1))
    earlier = index[None, :] < index[:, None]  # [i, j]: j comes before i
    denser = pair & ((density[:, None, :] > density[:, :, None])
                     | ((density[:, None, :] == density[:, :, None]) & earlier))
    largest = torch.cat([torch.where(pair, dist, 0.0).flatten(1), dist.new_zeros(batch, 1)], 1).amax(1)  # N may be 0
    largest = largest[:, None, None]
    parent = torch.cat([torch.where(denser, dist, largest), largest.expand(batch, n, 1)], -1).amin(-1)
    centre_score = torch.where(recycled, parent * density, -inf)
    centre_order = torch.sort(centre_score, dim=1, descending=True, stable=True).indices
    centre_rank = torch.zeros_like(centre_order).scatter(1, centre_order, index.expand(batch, n))
    is_centre = recycled & (centre_rank < c)
    to_centre = torch.where(is_centre[:, None, :], dist, inf)
    nearest_centre = torch.cat([to_centre, to_centre.new_full((batch, n, 1), float("inf"))], -1).argmin(-1)
    assign = torch.where(is_centre, index.expand(batch, n), nearest_centre)
    member = recycled.to(x.dtype)[..., None]
    sums = torch.zeros_like(x).scatter_add(1, assign[..., None].expand(batch, n, width), x * member)
    counts = torch.zeros_like(x[..., :1]).scatter_add(1, assign[..., None], member)
    aggregate = sums / counts.clamp_min(1)

    survivor = (kept | is_centre).long()
    chosen = torch.sort(survivor, dim=1, descending=True, stable=True).indices[:, :new_n]
    survivors = torch.gather(vision, 1, torch.sort(chosen, dim=1).values)  # [B, N'] positions, in order
    in_seq, keep, new_hidden = keep_survivors(hidden, vision, survivors)
    centre_at = torch.zeros_like(in_seq).scatter(1, vision, is_centre.long())
    aggregate_at = torch.zeros_like(hidden).scatter(1, vision[..., None].expand(batch, n, width), aggregate)
    slot_centre = torch.gather(centre_at, 1, keep).bool()
    slot_aggregate = torch.gather(aggregate_at, 1, keep[..., None].expand(batch, keep.shape[1], width))
    new_hidden = torch.where(slot_centre[..., None], slot_aggregate, new_hidden)
    return keep, new_hidden, new_vision_positions(in_seq, survivors)
