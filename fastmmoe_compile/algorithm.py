"""The pure math of FastMMoE (docs/fastmmoe.md sections 1 and 2): no graphs, no models.

Every graph op and pass calls these functions, so docs/fastmmoe.md's arithmetic lives in
one place. Tensor functions here are plain aten-traceable torch code: they run
eagerly as op implementations and are traced as the ops' decompositions.
"""
from __future__ import annotations

import math

import torch


def vision_topk(top_k: int, ratio: float) -> int:
    """Kv = max(1, floor(K * rho)), at most K (an explicit Kv is FastMMoEConfig.kv's)."""
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
    """Keep the kv highest-weight experts of each row's top-K selection (docs/fastmmoe.md section 1).

    Kept weights are rescaled by sum(K weights) / sum(kept weights). That one rule is
    every case of docs/fastmmoe.md: where the model normalises its top-K weights (their sum is
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


# --- Section 2: routing-aware token merging and pruning -------------------------------

# Stage ratios are applied in integer arithmetic, T = max(1, (N * P) // Q) with
# P = round(r * Q), so that the token count of every stage is an exact function of
# N that the exported graph can carry symbolically (floats never enter a shape).
RATIO_SCALE = 1_000_000
NORM_EPS = 1e-10


def ratio_units(ratio: float) -> int:
    return int(round(ratio * RATIO_SCALE))


MAX_VISION_TOKENS = 1 << 20  # bound under which vision_after_stage is exact


def vision_after_stage(num_vision, ratio_q: int):
    """min(N, T): the vision tokens left by a stage, in floor divisions only.

    Inductor cannot generate code for Min/Max size expressions, so the graph's sizes
    use this form, exact for 0 <= N <= MAX_VISION_TOKENS (ints and SymInts alike):
      A = floor(N*P/Q) is T whenever floor(N r) >= 1, and A <= N - 1 for N >= 1, r < 1;
      docs/fastmmoe.md's max(1, .) adds 1 exactly when 1 <= N <= N0, N0 = floor((Q-1)/P);
      [N >= k] = (N + NMAX) // (NMAX + k) for 0 <= N <= NMAX and 1 <= k.
    r = 1 (P = Q) gives N0 = 0, so the result is N: the stage keeps everything."""
    a = (num_vision * ratio_q) // RATIO_SCALE
    n0 = (RATIO_SCALE - 1) // ratio_q
    big = MAX_VISION_TOKENS
    return a + (num_vision + big) // (big + 1) - (num_vision + big) // (big + n0 + 1)


def _at_least_one(x):
    """[x >= 1] for -MAX_VISION_TOKENS <= x <= MAX_VISION_TOKENS + 1, in floor divisions only (ints, SymInts)."""
    big = MAX_VISION_TOKENS
    return (x + big) // (big + 1)


def compat_vision_after_stage(num_vision, ratio_q: int, merge_ratio_q: int, window: int):
    """The vision tokens a stage leaves under the authors' released code (docs/fastmmoe.md 2.11):
    N when N <= T or M' = min(floor(T * merge_ratio), G - 1) <= 0 (the stage is skipped), else
    min(T - floor(T * merge_ratio), N - M' * W) + M' (the authors keep at most the tokens outside
    merged windows; counted here as if every merged window were full, which keeps the count a
    function of N). T as in vision_after_stage; floor divisions only, so the count is an exact
    symbolic shape (min(a, b) = a - (a - b) [a - b >= 1])."""
    t = vision_after_stage(num_vision, ratio_q)
    f = (t * merge_ratio_q) // RATIO_SCALE
    g1 = (num_vision + window - 1) // window - 1
    m = f - (f - g1) * _at_least_one(f - g1)
    unmerged, room = t - f, num_vision - m * window
    kept = unmerged - (unmerged - room) * _at_least_one(unmerged - room)
    active = _at_least_one(m) * _at_least_one(num_vision - t)
    return num_vision + active * (kept + m - num_vision)


def merge_vision_after(num_vision, ratio_q: int, merge_ratio_q: int, window: int, compat: bool):
    """The vision tokens a merge stage leaves: ours (vision_after_stage) or, with compat, the authors'
    (compat_vision_after_stage). The one place the count's fork is chosen: the kernel (merge_stage) and
    the stage's description (config.MergeStage.vision_after, which the FLOPs count reads) both call it."""
    if compat:
        return compat_vision_after_stage(num_vision, ratio_q, merge_ratio_q, window)
    return vision_after_stage(num_vision, ratio_q)


def combine_scores(redundancy: torch.Tensor, attention: torch.Tensor, strategy: str, alpha: float) -> torch.Tensor:
    """docs/fastmmoe.md 2.6: a window's merge score from its routing redundancy and its (normalised) attention."""
    if strategy == "hybrid":
        return alpha * redundancy - (1 - alpha) * attention
    if strategy == "routing":
        return redundancy
    if strategy == "attention":
        return -attention
    raise ValueError(f"unknown strategy {strategy!r}")


def last_token_attention(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float | None):
    """Attention probabilities of the last query over all keys, averaged over heads.

    q [B, Hq, S, D], k [B, Hkv, S, D] (grouped-query heads repeat), mask broadcastable
    to [B, Hq, S, S] (bool: True = attend; float: additive) or None -> [B, S]."""
    heads, kv_heads = q.shape[1], k.shape[1]
    if kv_heads != heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # The last row by narrow(S - 1), not [-1:]: torch 2.11's Inductor cannot lower a slice with a negative
    # start over an unbacked length (--authors-compat's token counts: KeyError 'unbacked_bindings').
    scores = torch.matmul(q.narrow(2, q.shape[2] - 1, 1), k.transpose(-1, -2)).float() * scale  # [B, H, 1, S]
    if mask is not None:
        last = mask.narrow(-2, mask.shape[-2] - 1, 1)
        scores = scores.masked_fill(~last, float("-inf")) if last.dtype == torch.bool else scores + last.float()
    return scores.softmax(dim=-1).mean(dim=1)[:, 0, :]


def gather_tokens(x: torch.Tensor, keep: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """x gathered along each of `dims` (sequence axes) by keep [B, S']; a size-1 batch broadcasts."""
    batch = keep.shape[0]
    if x.shape[0] != batch:
        x = x.expand(batch, *x.shape[1:])
    for d in dims:
        shape = [batch] + [1] * (x.dim() - 1)
        shape[d] = keep.shape[1]
        index = keep.reshape(shape).expand(*[keep.shape[1] if i == d else s for i, s in enumerate(x.shape)])
        x = torch.gather(x, d, index)
    return x


def merge_stage(hidden, probs, attn, vision, ratio_q: int, merge_ratio_q: int, window: int, alpha: float,
                strategy: str, method: str, compat: bool = False):
    """One merge/prune stage (docs/fastmmoe.md 2.1-2.9) for every sample at once: the kernel of
    fastmmoe::merge_tokens on every backend (eager, Inductor, and ONNX, which decomposes the op
    into this function). hidden [B, S, H]; probs [B, S, E], [B*S, E] or None (FastV: attention
    only); attn [B, S] last-token attention; vision [B, N] increasing positions ->
    (keep [B, S'], hidden [B, S', H], vision [B, N']): keep holds positions in the current
    sequence (a merged token sits at its window's first token), vision positions in the new one.

    No loops, host syncs or data-dependent sizes, so graph backends can trace it: the counts
    T = max(1, floor(N*r)) and M (merged windows) are 0-d tensors; only sizes that are functions
    of N (N' = vision_after_stage, G windows) are shapes. Selection is one stable sort: first
    tokens of the M best windows rank first, their other members last, the rest by importance
    (ties to the earlier token). tests/merge_reference.py holds the per-sample loop this is
    checked against.

    compat=True is the authors' released code (docs/fastmmoe.md 2.11): M' = min(floor(T*mr), G-1)
    without our cap, the stage skipped when M' is 0, T - floor(T*mr) + M' tokens left, a partial last
    window padded with the mean routing vector of all vision tokens (a one-token window scores 0 and
    may be "merged" into itself), window attention divided by (max + 1e-10)."""
    batch, seq, width = hidden.shape
    n = vision.shape[1]
    probs = attn[..., None] if probs is None else probs.reshape(batch, seq, -1)
    groups = (n + window - 1) // window
    pad = groups * window - n
    n_t = torch.ones_like(vision[0]).sum()  # N as a tensor
    target = ((n_t * ratio_q) // RATIO_SCALE).clamp_min(1)
    merged_count = torch.minimum((target * merge_ratio_q) // RATIO_SCALE, (n_t + window - 1) // window - 1)
    new_n = merge_vision_after(n, ratio_q, merge_ratio_q, window, compat)
    if compat:
        merged_count = torch.where(n_t > target, merged_count.clamp_min(0), 0)
    else:
        merged_count = torch.minimum(merged_count, (n_t - target).clamp_min(0) // (window - 1)).clamp_min(0)

    p = torch.gather(probs, 1, vision[..., None].expand(batch, n, probs.shape[-1]))
    a = torch.gather(attn, 1, vision)
    valid = torch.nn.functional.pad(torch.ones_like(a), (0, pad)).reshape(batch, groups, window)
    count = valid.sum(dim=2)
    if compat:  # pad rows: the mean routing vector of the sample's vision tokens, part of the window centre
        fill = p.mean(dim=1, keepdim=True).expand(batch, pad, probs.shape[-1])
        pw = torch.cat([p, fill], 1).reshape(batch, groups, window, probs.shape[-1])
        centre = pw.mean(dim=2)
    else:
        pw = torch.nn.functional.pad(p, (0, 0, 0, pad)).reshape(batch, groups, window, probs.shape[-1])
        centre = (pw * valid[..., None]).sum(dim=2) / count[..., None]
    cos = torch.nn.functional.cosine_similarity(pw, centre[:, :, None, :].expand_as(pw), dim=-1, eps=1e-12)
    redundancy = (cos * valid).sum(dim=2) / count
    attention = (torch.nn.functional.pad(a, (0, pad)).reshape(batch, groups, window) * valid).sum(dim=2) / count
    top = torch.cat([attention, attention.new_zeros(batch, 1)], 1).amax(1, keepdim=True)
    attention = attention / (top + 1e-10 if compat else top.clamp_min(1e-30))
    if compat:
        score = combine_scores(redundancy.masked_fill(count < 2, 0.0), attention, strategy, alpha)
    else:
        score = combine_scores(redundancy, attention, strategy, alpha).masked_fill(count < 2, float("-inf"))

    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    ranks = torch.arange(groups, device=hidden.device).expand(batch, groups)
    rank = torch.zeros_like(order).scatter(1, order, ranks)
    merged = rank < merged_count  # [B, G]: the M best windows
    token_window = torch.arange(n, device=hidden.device) // window
    in_merged = torch.gather(merged, 1, token_window.expand(batch, n))
    is_first = in_merged & (torch.arange(n, device=hidden.device) % window == 0)
    importance = p.norm(dim=-1) if strategy == "routing" else a
    inf = torch.full_like(importance, float("inf"))
    key = torch.where(is_first, inf, torch.where(in_merged, -inf, importance))
    chosen = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :new_n]
    survivors = torch.gather(vision, 1, torch.sort(chosen, dim=1).values)  # [B, N'] positions, in order

    kept = torch.ones(batch, seq, dtype=torch.int64, device=hidden.device)
    kept = kept.scatter(1, vision, torch.zeros_like(vision)).scatter(1, survivors, torch.ones_like(survivors))
    keep = torch.sort(1 - kept, dim=1, stable=True).indices[:, : seq - n + new_n]
    new_hidden = torch.gather(hidden, 1, keep[..., None].expand(batch, keep.shape[1], width))

    members = torch.gather(hidden, 1, vision[..., None].expand(batch, n, width))
    members = torch.nn.functional.pad(members, (0, 0, 0, pad)).reshape(batch, groups, window, width)
    mean = (members * valid[..., None]).sum(dim=2) / count[..., None]
    if method == "mlerp":
        mean = mean / mean.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS) * members.norm(dim=-1).amax(2)[..., None]
    elif method != "mean":
        raise ValueError(f"unknown merge method {method!r}")
    mean = torch.cat([mean, mean.new_zeros(batch, 1, width)], 1)  # a row for text slots to read when N is 0
    first_at = torch.zeros_like(kept).scatter(1, vision, is_first.long())
    window_at = torch.zeros_like(kept).scatter(1, vision, token_window.expand(batch, n))
    slot_first = torch.gather(first_at, 1, keep).bool()
    slot_merged = torch.gather(mean, 1, torch.gather(window_at, 1, keep)[..., None].expand(batch, keep.shape[1], width))
    # The means are taken in the scores' dtype (fp32 for a bf16 model); the stream keeps its own.
    new_hidden = torch.where(slot_first[..., None], slot_merged.to(hidden.dtype), new_hidden)
    new_vision = torch.gather(kept.cumsum(dim=1) - 1, 1, survivors)
    return keep, new_hidden, new_vision
