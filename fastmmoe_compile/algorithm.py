"""The pure math of FastMMoE (spec sections 1 and 2): no graphs, no models.

Every graph op and pass calls these functions, so the spec's arithmetic lives in
one place. Tensor functions here are plain aten-traceable torch code: they run
eagerly as op implementations and are traced as the ops' decompositions.
"""
from __future__ import annotations

import math

import torch


def vision_topk(top_k: int, ratio: float, explicit: int | None = None) -> int:
    """Kv = max(1, floor(K * rho)), or the explicit value (clamped to K)."""
    if explicit is not None:
        return max(1, min(int(explicit), top_k))
    # The epsilon keeps floor(8 * 0.5) == 4 even if ratio arrives as 0.49999999.
    return max(1, min(top_k, math.floor(top_k * ratio + 1e-9)))


def stage_ratios(keep_ratio: float, num_stages: int, explicit: tuple[float, ...] | None = None) -> list[float]:
    """Per-stage retention: r = keep_ratio ** (1/n) for each of n stages, unless given."""
    if explicit is not None:
        return list(explicit)
    if num_stages == 0:
        return []
    return [keep_ratio ** (1.0 / num_stages)] * num_stages


def keep_top_experts(weights: torch.Tensor, ids: torch.Tensor, kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the kv highest-weight experts of each row's top-K selection (spec section 1).

    Kept weights are rescaled by sum(K weights) / sum(kept weights). That one rule is
    every case of the spec: where the model normalises its top-K weights (their sum is
    1, times any routed_scaling_factor) the kept ones are renormalised; where it does
    not, the kept mass equals the original mass. The scaling factor cancels in the ratio.
    """
    kept_w, slot = torch.topk(weights, kv, dim=-1)
    kept_ids = torch.gather(ids, -1, slot)
    scale = weights.sum(dim=-1, keepdim=True) / kept_w.sum(dim=-1, keepdim=True)
    return kept_w * scale, kept_ids


def flat_vision_index(vision_positions: torch.Tensor, seq_len) -> torch.Tensor:
    """[B, N] positions within each sample -> [B*N] rows of the flattened [B*S] token axis."""
    batch = vision_positions.shape[0]
    offsets = torch.arange(batch, device=vision_positions.device, dtype=vision_positions.dtype) * seq_len
    return (vision_positions + offsets[:, None]).reshape(-1)


def text_index(num_tokens, flat_vision: torch.Tensor) -> torch.Tensor:
    """Rows of the flattened token axis that are not vision rows, in order.

    A stable sort of the vision flags puts the text rows first; their count
    (T - B*N) is a function of input shapes, so no data-dependent size appears.
    """
    is_vision = torch.zeros(num_tokens, dtype=torch.int8, device=flat_vision.device)
    is_vision = is_vision.index_fill(0, flat_vision, 1)
    order = torch.sort(is_vision, stable=True).indices
    return order[: num_tokens - flat_vision.shape[0]]


def all_pairs(weights: torch.Tensor, ids: torch.Tensor):
    """Every (token, expert) pair of a [T, K] routing: the unmodified model."""
    num_tokens, top_k = weights.shape
    token = torch.arange(num_tokens, device=weights.device)[:, None].expand(num_tokens, top_k).reshape(-1)
    return token, ids.reshape(-1), weights.reshape(-1)


def modality_pairs(weights: torch.Tensor, ids: torch.Tensor, vision_positions: torch.Tensor, kv: int):
    """The (token, expert) pairs of Top-Kv routing: K per text token, kv per vision token.

    weights/ids are [T, K] over the flattened [B*S] tokens; vision_positions is [B, N].
    Returns (token, expert, weight), each of length (T - B*N)*K + B*N*kv: the dropped
    pairs do not exist, so nothing downstream can compute them.
    """
    num_tokens, top_k = weights.shape
    batch = vision_positions.shape[0]
    flat_v = flat_vision_index(vision_positions, num_tokens // batch)
    text = text_index(num_tokens, flat_v)
    text_token = text[:, None].expand(text.shape[0], top_k).reshape(-1)
    vis_w, vis_ids = keep_top_experts(weights[flat_v], ids[flat_v], kv)
    vis_token = flat_v[:, None].expand(flat_v.shape[0], kv).reshape(-1)
    token = torch.cat([text_token, vis_token])
    expert = torch.cat([ids[text].reshape(-1), vis_ids.reshape(-1)])
    weight = torch.cat([weights[text].reshape(-1), vis_w.reshape(-1)])
    return token, expert, weight


def num_modality_pairs(num_tokens, num_vision, top_k: int, kv: int):
    """Pair count of modality_pairs: (T - V)*K + V*kv (ints or SymInts)."""
    return (num_tokens - num_vision) * top_k + num_vision * kv
