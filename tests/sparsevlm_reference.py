"""An eager reference of the SparseVLM baseline (docs/fastmmoe.md 5.2), written from its text and the
paper (arXiv 2410.04417), independent of fastmmoe_compile: plain Python over token indices, the
Hugging Face layers run one by one with eager attention (their own attention weights), one sample
at a time. Shares no code with sparsevlm_math or the pass (the eager layer loop is tests/reference.py's)."""
from __future__ import annotations

import math

import torch

from .reference import LayerStages, eager_prefill


def raters_of(embeds: torch.Tensor, vision: list[bool]) -> list[int]:
    """Text tokens after the first vision token whose relevance (mean over vision tokens v of the
    softmax over those text tokens of e_v . e_t) is above the mean; all of them if none is."""
    vis = [i for i, v in enumerate(vision) if v]
    if not vis:
        return []
    text = [i for i, v in enumerate(vision) if not v and i > vis[0]]
    if not text:
        return []
    relevance = torch.zeros(len(text), dtype=torch.float64)
    for v in vis:
        logits = torch.tensor([float(torch.dot(embeds[v], embeds[t])) for t in text], dtype=torch.float64)
        relevance += logits.softmax(dim=0)
    relevance /= len(vis)
    mean = float(relevance.mean())
    chosen = [t for t, r in zip(text, relevance.tolist()) if r > mean]
    return chosen or text


def stage(h: torch.Tensor, score: list[float], vision: list[bool], ratio, recycle, cluster):
    """One stage on one sample: h [S, H], score[i] = attention token i receives from the raters.
    Returns (kept indices, new h, new vision flags)."""
    vis = [i for i, v in enumerate(vision) if v]
    n = len(vis)
    t = min(n, max(1, math.floor(n * ratio)))
    if t == n:
        return list(range(len(vision))), h, vision
    d = n - t
    c = min(t, math.floor((math.floor(d * recycle) + 1) * cluster) + 1)
    k = t - c
    ranked = sorted(vis, key=lambda i: (-score[i], i))
    kept, deleted = ranked[:k], ranked[k:]
    recycled = deleted[:math.floor(len(deleted) * recycle) + 1]

    width = h.shape[1]
    x = {i: h[i].double() for i in recycled}
    dist = {(i, j): float((x[i] - x[j]).norm()) / math.sqrt(width) for i in recycled for j in recycled}
    density = {i: math.exp(-sum(dd * dd for dd in sorted(dist[i, j] for j in recycled)[:c]) / c) for i in recycled}
    largest = max(dist.values())
    # j is denser than i: higher density, or the same density and earlier (a strict order: one densest)
    parent = {i: min([dist[i, j] for j in recycled if (density[j], -j) > (density[i], -i)], default=largest)
              for i in recycled}
    centres = sorted(recycled, key=lambda i: (-parent[i] * density[i], i))[:c]
    groups = {cc: [] for cc in centres}
    for i in recycled:
        groups[i if i in groups else min(centres, key=lambda cc: (dist[i, cc], cc))].append(i)

    keep = sorted([i for i, v in enumerate(vision) if not v] + kept + centres)
    rows = [torch.stack([h[j] for j in groups[i]]).mean(dim=0) if i in groups else h[i] for i in keep]
    return keep, torch.stack(rows), [vision[i] for i in keep]


def eager_sparsevlm(lm, embeds, vision_mask, stages, rope_positions=None, deepstack=None, caches=None):
    """The prefill with SparseVLM stages {layer: (ratio, recycle_ratio, cluster_ratio)}: the stage runs
    inside the layer after its attention and residual add, before its MLP / MoE block, rated by that
    layer's attention weights (the eager layer loop: tests/reference.eager_prefill; caches as there). Returns
    (last-token logits [B, V], kept original positions per sample)."""
    raters = [raters_of(embeds[b], vision_mask[b].tolist()) for b in range(embeds.shape[0])]  # original
    # indices; text tokens are never dropped

    def sparsify(b, layer, h, weights, positions, vision, settings):
        probs = weights[0].float().mean(dim=0)  # [S, S], heads averaged
        rows = [positions.index(r) for r in raters[b]]
        score = probs[rows].mean(dim=0).tolist() if rows else [0.0] * h.shape[1]
        return stage(h[0], score, vision, *settings)

    return eager_prefill(lm, embeds, vision_mask, LayerStages(stages, sparsify), rope_positions, deepstack,
                         caches=caches)
