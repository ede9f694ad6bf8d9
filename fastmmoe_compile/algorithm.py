"""The pure math of FastMMoE (docs/fastmmoe.md sections 1 and 2): no graphs, no models.

Every graph op and pass calls these functions, so docs/fastmmoe.md's arithmetic lives in
one place. Tensor functions here are plain aten-traceable torch code: they run
eagerly as op implementations and are traced as the ops' decompositions.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

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
    """The vision tokens a merge stage leaves (ints or SymInts): merge_kernel(compat)'s count, which the
    op's fake (ops.merge_tokens) and the stage's description (config.MergeStage.vision_after, which the
    FLOPs count reads) call, as the kernel itself does."""
    return merge_kernel(compat).vision_after(num_vision, ratio_q, merge_ratio_q, window)


def combine_scores(redundancy: torch.Tensor, attention: torch.Tensor, strategy: str, alpha: float) -> torch.Tensor:
    """docs/fastmmoe.md 2.6: a window's merge score from its routing redundancy and its (normalised) attention."""
    if strategy == "hybrid":
        return alpha * redundancy - (1 - alpha) * attention
    if strategy == "routing":
        return redundancy
    if strategy == "attention":
        return -attention
    raise ValueError(f"unknown strategy {strategy!r}")


def head_mean_attention(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float | None
                        ) -> torch.Tensor:
    """Attention probabilities of every query row over all keys, averaged over heads: [B, Sq, S] float32.

    q [B, Hq, Sq, D], k [B, Hkv, S, D] (grouped-query heads repeat), mask broadcastable to
    [B, Hq, Sq, S] (bool: True = attend; float: additive) or None (no mask). The one attention
    computation of the scoring ops: last_token_attention (docs/fastmmoe.md 2.3) takes its last row,
    sparsevlm_math.rater_attention (5.2) all of them."""
    heads, kv_heads = q.shape[1], k.shape[1]
    if kv_heads != heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # [B, H, Sq, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    return scores.softmax(dim=-1).mean(dim=1)


def last_token_attention(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float | None):
    """Attention probabilities of the last query over all keys, averaged over heads (docs/fastmmoe.md 2.3).

    q [B, Hq, S, D], k [B, Hkv, S, D] (grouped-query heads repeat), mask broadcastable
    to [B, Hq, S, S] (bool: True = attend; float: additive) or None -> [B, S] float32."""
    # The last row by narrow(S - 1), not [-1:]: torch 2.11's Inductor cannot lower a slice with a negative
    # start over an unbacked length (--authors-compat's token counts: KeyError 'unbacked_bindings').
    last = None if mask is None else mask.narrow(-2, mask.shape[-2] - 1, 1)
    return head_mean_attention(q.narrow(2, q.shape[2] - 1, 1), k, last, scale)[:, 0, :]


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


# --- The steps of one stage (docs/fastmmoe.md 2.1-2.9; 2.11 where the authors' code differs) ----------
#
# Every step works on all samples at once and is aten-traceable: no loops, host syncs or data-dependent
# sizes. Counts that depend on N (T, M) are 0-d int64 tensors; shapes are functions of N only
# (G windows, N' = vision_after_stage / compat_vision_after_stage). Shapes: B samples, S tokens,
# H hidden width, E experts, N vision tokens, G = ceil(N / W) windows of W.


class Windows(NamedTuple):
    """docs/fastmmoe.md 2.4: the N vision tokens cut into G = ceil(N / W) consecutive windows of W."""
    valid: torch.Tensor  # [B, G, W] 1 at a real token, 0 at the padding of a partial last window (a's dtype)
    count: torch.Tensor  # [B, G] real tokens per window (a's dtype)
    groups: int  # G (int or SymInt)
    pad: int  # G * W - N: padding rows of the last window
    size: int  # W


def vision_count(vision: torch.Tensor) -> torch.Tensor:
    """N as a 0-d int64 tensor, from vision [B, N] (so counts derived from it stay tensors)."""
    return torch.ones_like(vision[0]).sum()


def stage_target(n_t: torch.Tensor, ratio_q: int) -> torch.Tensor:
    """2.1 Target: T = max(1, (N * P) // 10^6), a 0-d tensor (n_t: N, vision_count; ratio_q: P)."""
    return ((n_t * ratio_q) // RATIO_SCALE).clamp_min(1)


def _window_count_formula(n_t: torch.Tensor, target: torch.Tensor, merge_ratio_q: int, window: int) -> torch.Tensor:
    """2.7 / 2.11: M' = min(floor(T * merge_ratio), G - 1), 0-d (negative when N is 0)."""
    return torch.minimum((target * merge_ratio_q) // RATIO_SCALE, (n_t + window - 1) // window - 1)


def merged_window_count(n_t: torch.Tensor, target: torch.Tensor, merge_ratio_q: int, window: int) -> torch.Tensor:
    """2.7 Merge, how many: M = min(floor(T * merge_ratio), G - 1), capped (our choice) so that T - M
    unmerged tokens remain, N - M*(W-1) >= T; 0-d, >= 0."""
    merged = _window_count_formula(n_t, target, merge_ratio_q, window)
    return torch.minimum(merged, (n_t - target).clamp_min(0) // (window - 1)).clamp_min(0)


def compat_merged_window_count(n_t: torch.Tensor, target: torch.Tensor, merge_ratio_q: int, window: int
                               ) -> torch.Tensor:
    """2.11 Skipped stages: M' = min(floor(T * merge_ratio), G - 1) without 2.7's cap, and 0 (the stage
    keeps everything) when N <= T; 0-d, >= 0."""
    merged = _window_count_formula(n_t, target, merge_ratio_q, window)
    return torch.where(n_t > target, merged.clamp_min(0), 0)


def routing_distributions(probs: torch.Tensor | None, attn: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
    """2.2 Routing distributions: p [B, N, E] of the vision tokens, in probs' dtype.

    probs [B, S, E] or [B*S, E] (the router's probabilities over every current token), or None (FastV:
    attention only, then p is attn [B, S] as one "expert"); vision [B, N] positions."""
    batch, seq = attn.shape
    probs = attn[..., None] if probs is None else probs.reshape(batch, seq, -1)
    return torch.gather(probs, 1, vision[..., None].expand(batch, vision.shape[1], probs.shape[-1]))


def attention_importance(attn: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
    """2.3 Attention importance: a [B, N] float32, the last token's attention (attn [B, S],
    last_token_attention) at the vision positions vision [B, N]."""
    return torch.gather(attn, 1, vision)


def windows(a: torch.Tensor, window: int) -> Windows:
    """2.4 Windows of W = `window` over the N vision tokens of a [B, N]: which rows are real, how many."""
    batch, n = a.shape
    groups = (n + window - 1) // window
    pad = groups * window - n
    valid = torch.nn.functional.pad(torch.ones_like(a), (0, pad)).reshape(batch, groups, window)
    return Windows(valid, valid.sum(dim=2), groups, pad, window)


def window_rows(x: torch.Tensor, win: Windows) -> torch.Tensor:
    """x [B, N, C] per vision token -> [B, G, W, C], the partial last window padded with zeros."""
    padded = torch.nn.functional.pad(x, (0, 0, 0, win.pad))
    return padded.reshape(x.shape[0], win.groups, win.size, x.shape[-1])


def _routing_redundancy(pw: torch.Tensor, centre: torch.Tensor, win: Windows) -> torch.Tensor:
    """2.5: [B, G] mean over each window's real tokens of cos(p_i, c_g); pw [B, G, W, E], centre [B, G, E]."""
    cos = torch.nn.functional.cosine_similarity(pw, centre[:, :, None, :].expand_as(pw), dim=-1, eps=1e-12)
    return (cos * win.valid).sum(dim=2) / win.count


def _window_attention(a: torch.Tensor, win: Windows) -> tuple[torch.Tensor, torch.Tensor]:
    """2.5: ([B, G] mean a_i of each window, [B, 1] the largest of them, 0 when N is 0)."""
    batch = a.shape[0]
    padded = torch.nn.functional.pad(a, (0, win.pad)).reshape(batch, win.groups, win.size)
    attention = (padded * win.valid).sum(dim=2) / win.count
    return attention, torch.cat([attention, attention.new_zeros(batch, 1)], 1).amax(1, keepdim=True)


def window_statistics(p: torch.Tensor, a: torch.Tensor, win: Windows) -> tuple[torch.Tensor, torch.Tensor]:
    """2.5 Window statistics: (routing redundancy [B, G], attention [B, G] divided by the stage's largest),
    from p [B, N, E] (routing_distributions) and a [B, N] (attention_importance); float32 for float32 a.
    A window's centre is the mean of its real members' p."""
    pw = window_rows(p, win)
    centre = (pw * win.valid[..., None]).sum(dim=2) / win.count[..., None]
    redundancy = _routing_redundancy(pw, centre, win)
    attention, top = _window_attention(a, win)
    return redundancy, attention / top.clamp_min(1e-30)


def compat_window_statistics(p: torch.Tensor, a: torch.Tensor, win: Windows) -> tuple[torch.Tensor, torch.Tensor]:
    """2.11 Padding: window_statistics as the authors' code takes them, the partial last window filled up
    to W with the mean routing vector of all the stage's vision tokens before its centre is taken, and
    window attention divided by (max + 1e-10)."""
    batch, _, experts = p.shape
    fill = p.mean(dim=1, keepdim=True).expand(batch, win.pad, experts)
    pw = torch.cat([p, fill], 1).reshape(batch, win.groups, win.size, experts)
    centre = pw.mean(dim=2)
    redundancy = _routing_redundancy(pw, centre, win)
    attention, top = _window_attention(a, win)
    return redundancy, attention / (top + 1e-10)


def window_scores(redundancy: torch.Tensor, attention: torch.Tensor, win: Windows, strategy: str, alpha: float
                  ) -> torch.Tensor:
    """2.6 Window score [B, G] (combine_scores); a window with fewer than two tokens scores -inf (2.4:
    it can never be merged)."""
    return combine_scores(redundancy, attention, strategy, alpha).masked_fill(win.count < 2, float("-inf"))


def compat_window_scores(redundancy: torch.Tensor, attention: torch.Tensor, win: Windows, strategy: str,
                         alpha: float) -> torch.Tensor:
    """2.11 Padding: the score [B, G] of the authors' code, where a one-token window has redundancy 0
    and competes like any other (it can be "merged" into itself)."""
    return combine_scores(redundancy.masked_fill(win.count < 2, 0.0), attention, strategy, alpha)


def merged_windows(score: torch.Tensor, merged_count: torch.Tensor, win: Windows, n: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2.7 Merge, which: the merged_count best-scoring windows of score [B, G] (ties to the earlier
    window), read per vision token -> (window [N] int64 each token's window, in_merged [B, N] bool,
    is_first [B, N] bool: the first token of a merged window, where its merged token sits)."""
    batch, groups = score.shape
    device = score.device
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    ranks = torch.arange(groups, device=device).expand(batch, groups)
    rank = torch.zeros_like(order).scatter(1, order, ranks)
    merged = rank < merged_count  # [B, G]: the M best windows
    token_window = torch.arange(n, device=device) // win.size
    in_merged = torch.gather(merged, 1, token_window.expand(batch, n))
    is_first = in_merged & (torch.arange(n, device=device) % win.size == 0)
    return token_window, in_merged, is_first


def prune(p: torch.Tensor, a: torch.Tensor, vision: torch.Tensor, in_merged: torch.Tensor, is_first: torch.Tensor,
          strategy: str, new_n: int) -> torch.Tensor:
    """2.8 Prune: the surviving vision positions [B, N'] (N' = new_n), in sequence order: the first token
    of every merged window, then of the tokens outside merged windows the most important (|p_i| for
    `routing`, a_i otherwise; ties to the earlier token). One stable sort ranks all three kinds."""
    importance = p.norm(dim=-1) if strategy == "routing" else a
    inf = torch.full_like(importance, float("inf"))
    key = torch.where(is_first, inf, torch.where(in_merged, -inf, importance))
    chosen = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :new_n]
    return torch.gather(vision, 1, torch.sort(chosen, dim=1).values)


def merge_vectors(hidden: torch.Tensor, vision: torch.Tensor, win: Windows, method: str) -> torch.Tensor:
    """2.7 Merge, into what: [B, G + 1, H], each window's merged vector in the scores' dtype (fp32 for a
    bf16 model; `mlerp` or `mean`), and a last zero row that text slots read when N is 0.
    hidden [B, S, H] the residual stream, vision [B, N] positions."""
    batch, _, width = hidden.shape
    members = torch.gather(hidden, 1, vision[..., None].expand(batch, vision.shape[1], width))
    members = window_rows(members, win)
    mean = (members * win.valid[..., None]).sum(dim=2) / win.count[..., None]
    if method == "mlerp":
        mean = mean / mean.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS) * members.norm(dim=-1).amax(2)[..., None]
    elif method != "mean":
        raise ValueError(f"unknown merge method {method!r}")
    return torch.cat([mean, mean.new_zeros(batch, 1, width)], 1)


def keep_survivors(hidden: torch.Tensor, vision: torch.Tensor, survivors: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2.9 Order: every text token and the survivors [B, N'] of the vision positions vision [B, N], in
    sequence order -> (kept [B, S] int64, 1 at a kept position; keep [B, S'] the kept positions;
    hidden [B, S', H] gathered at them). S' = S - N + N'. sparsevlm_math.sparsevlm_stage keeps alike."""
    batch, seq, width = hidden.shape
    n, new_n = vision.shape[1], survivors.shape[1]
    kept = torch.ones(batch, seq, dtype=torch.int64, device=hidden.device)
    kept = kept.scatter(1, vision, torch.zeros_like(vision)).scatter(1, survivors, torch.ones_like(survivors))
    keep = torch.sort(1 - kept, dim=1, stable=True).indices[:, : seq - n + new_n]
    return kept, keep, torch.gather(hidden, 1, keep[..., None].expand(batch, keep.shape[1], width))


def new_vision_positions(kept: torch.Tensor, survivors: torch.Tensor) -> torch.Tensor:
    """2.9 Positions: the survivors' [B, N'] places in the reduced sequence (kept from keep_survivors)."""
    return torch.gather(kept.cumsum(dim=1) - 1, 1, survivors)


def order_and_positions(hidden: torch.Tensor, vision: torch.Tensor, survivors: torch.Tensor, is_first: torch.Tensor,
                        token_window: torch.Tensor, win: Windows, method: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2.9 Order and positions: the stage's outputs (keep [B, S'] int64 kept positions of the current
    sequence, hidden [B, S', H] in hidden's dtype, vision [B, N'] int64 positions in the new sequence).
    Text tokens and survivors [B, N'] (prune) keep their order; a merged token (merge_vectors) sits at
    its window's first token (is_first [B, N], token_window [N] from merged_windows)."""
    batch, _, width = hidden.shape
    n = vision.shape[1]
    kept, keep, new_hidden = keep_survivors(hidden, vision, survivors)
    mean = merge_vectors(hidden, vision, win, method)
    first_at = torch.zeros_like(kept).scatter(1, vision, is_first.long())
    window_at = torch.zeros_like(kept).scatter(1, vision, token_window.expand(batch, n))
    slot_first = torch.gather(first_at, 1, keep).bool()
    slot_merged = torch.gather(mean, 1, torch.gather(window_at, 1, keep)[..., None].expand(batch, keep.shape[1], width))
    # The means are taken in the scores' dtype (fp32 for a bf16 model); the stream keeps its own.
    new_hidden = torch.where(slot_first[..., None], slot_merged.to(hidden.dtype), new_hidden)
    return keep, new_hidden, new_vision_positions(kept, survivors)


def _merge_and_prune(hidden, vision, p, a, win: Windows, score, merged_count, new_n, strategy: str, method: str):
    """2.7-2.9 from the window scores on: the steps both kernels share."""
    token_window, in_merged, is_first = merged_windows(score, merged_count, win, vision.shape[1])
    survivors = prune(p, a, vision, in_merged, is_first, strategy, new_n)
    return order_and_positions(hidden, vision, survivors, is_first, token_window, win, method)


def default_merge_stage(hidden, probs, attn, vision, ratio_q: int, merge_ratio_q: int, window: int, alpha: float,
                        strategy: str, method: str):
    """One stage as docs/fastmmoe.md 2.1-2.9 specify it (merge_stage's arguments and outputs)."""
    n_t = vision_count(vision)
    target = stage_target(n_t, ratio_q)  # 2.1
    merged_count = merged_window_count(n_t, target, merge_ratio_q, window)  # 2.7: M
    new_n = default_vision_after(vision.shape[1], ratio_q, merge_ratio_q, window)  # 2.8: T tokens leave
    p = routing_distributions(probs, attn, vision)  # 2.2
    a = attention_importance(attn, vision)  # 2.3
    win = windows(a, window)  # 2.4
    redundancy, attention = window_statistics(p, a, win)  # 2.5
    score = window_scores(redundancy, attention, win, strategy, alpha)  # 2.6
    return _merge_and_prune(hidden, vision, p, a, win, score, merged_count, new_n, strategy, method)  # 2.7-2.9


def compat_merge_stage(hidden, probs, attn, vision, ratio_q: int, merge_ratio_q: int, window: int, alpha: float,
                       strategy: str, method: str):
    """One stage as the authors' released code does it (docs/fastmmoe.md 2.11): default_merge_stage's
    steps but for the window count (compat_merged_window_count), the tokens left
    (compat_vision_after_stage), the padded window statistics and the scores of one-token windows."""
    n_t = vision_count(vision)
    target = stage_target(n_t, ratio_q)  # 2.1
    merged_count = compat_merged_window_count(n_t, target, merge_ratio_q, window)  # 2.11: skipped stages
    new_n = compat_vision_after_stage(vision.shape[1], ratio_q, merge_ratio_q, window)  # 2.11: count
    p = routing_distributions(probs, attn, vision)  # 2.2
    a = attention_importance(attn, vision)  # 2.3
    win = windows(a, window)  # 2.4
    redundancy, attention = compat_window_statistics(p, a, win)  # 2.11: padding
    score = compat_window_scores(redundancy, attention, win, strategy, alpha)  # 2.11: padding
    return _merge_and_prune(hidden, vision, p, a, win, score, merged_count, new_n, strategy, method)  # 2.7-2.9


def default_vision_after(num_vision, ratio_q: int, merge_ratio_q: int, window: int):
    """The vision tokens default_merge_stage leaves: T (2.8), vision_after_stage; merge_ratio_q and window
    do not change it (merge_kernel's count signature)."""
    return vision_after_stage(num_vision, ratio_q)


class MergeKernel(NamedTuple):
    """A merge stage's kernel and the count of vision tokens it leaves, chosen together (merge_kernel)."""
    stage: Callable  # (hidden, probs, attn, vision, ratio_q, merge_ratio_q, window, alpha, strategy, method)
    vision_after: Callable  # (num_vision, ratio_q, merge_ratio_q, window) -> N', ints or SymInts


DEFAULT_KERNEL = MergeKernel(default_merge_stage, default_vision_after)  # docs/fastmmoe.md 2.1-2.9
COMPAT_KERNEL = MergeKernel(compat_merge_stage, compat_vision_after_stage)  # docs/fastmmoe.md 2.11


def merge_kernel(compat: bool) -> MergeKernel:
    """The one place the authors-compat fork is chosen: the authors' released code (2.11) or the spec's
    steps (2.1-2.9). merge_stage (the kernel) and merge_vision_after (its count) both ask here."""
    return COMPAT_KERNEL if compat else DEFAULT_KERNEL


def merge_stage(hidden, probs, attn, vision, ratio_q: int, merge_ratio_q: int, window: int, alpha: float,
                strategy: str, method: str, compat: bool = False):
    """One merge/prune stage (docs/fastmmoe.md 2.1-2.9) for every sample at once: the kernel of
    fastmmoe::merge_tokens on every backend (eager, Inductor, and ONNX, which decomposes the op
    into this function). hidden [B, S, H]; probs [B, S, E], [B*S, E] or None (FastV: attention
    only); attn [B, S] float32 last-token attention; vision [B, N] int64 increasing positions ->
    (keep [B, S'], hidden [B, S', H], vision [B, N']): keep holds positions in the current
    sequence (a merged token sits at its window's first token), vision positions in the new one.

    No loops, host syncs or data-dependent sizes, so graph backends can trace it: the counts
    T = max(1, floor(N*r)) and M (merged windows) are 0-d tensors; only sizes that are functions
    of N (N' = merge_vision_after, G windows) are shapes. Selection is one stable sort: first
    tokens of the M best windows rank first, their other members last, the rest by importance
    (ties to the earlier token). tests/merge_reference.py holds the per-sample loop this is
    checked against.

    compat=True runs the authors' released code (compat_merge_stage, docs/fastmmoe.md 2.11), the default
    the spec's steps (default_merge_stage); merge_kernel chooses."""
    return merge_kernel(compat).stage(hidden, probs, attn, vision, ratio_q, merge_ratio_q, window, alpha, strategy,
                                      method)
