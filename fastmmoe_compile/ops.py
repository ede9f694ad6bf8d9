"""Registered custom ops of the rewritten graphs, with fake (meta) implementations.

- fastmmoe::route_pairs / route_pairs_topkv: a router's top-K output as a compact
  list of (token, expert, weight) pairs. The passes rewrite one into the other; at
  lowering they decompose into plain aten (DECOMPOSITIONS) so Inductor fuses them.
- fastmmoe::grouped_mm: a grouped GEMM over expert segments. torch._grouped_mm's
  meta function accepts only bf16, so export of fp32 graphs needs this opaque op;
  its kernel is torch._grouped_mm wherever that kernel runs (CPU fp32/bf16, CUDA bf16).
  AOTInductor calls it through its proxy executor: import this module before loading.
"""
from __future__ import annotations

import torch

from . import algorithm, sparsevlm_math


@torch.library.custom_op("fastmmoe::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [P, in] rows sorted by group, w [G, in, out], offs [G] cumulative row ends -> [P, out]."""
    if _native_grouped_mm_ok(x, w):
        return torch._grouped_mm(x, w, offs=offs)
    out = x.new_zeros(x.shape[0], w.shape[-1])
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(x[start:end], w[g], out=out[start:end])
        start = end
    return out


@grouped_mm.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[-1])


def _native_grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.shape[0] == 0:
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    return x.dtype == torch.bfloat16 and x.device.type == "cuda"


@torch.library.custom_op("fastmmoe::route_pairs", mutates_args=())
def route_pairs(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All K pairs of every token (the unmodified router)."""
    return tuple(t.clone() for t in algorithm.all_pairs(weights, ids))


@route_pairs.register_fake
def _(weights, ids):
    n = weights.shape[0] * weights.shape[1]
    return ids.new_empty(n), ids.new_empty(n), weights.new_empty(n)


@torch.library.custom_op("fastmmoe::route_pairs_topkv", mutates_args=())
def route_pairs_topkv(
    weights: torch.Tensor, ids: torch.Tensor, vision_positions: torch.Tensor, kv: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K pairs per text token, the kv highest-weight ones per vision token (docs/fastmmoe.md section 1)."""
    return tuple(t.clone() for t in algorithm.modality_pairs(weights, ids, vision_positions, kv))


@route_pairs_topkv.register_fake
def _(weights, ids, vision_positions, kv):
    n = algorithm.num_modality_pairs(weights.shape[0], vision_positions.numel(), weights.shape[1], kv)
    return ids.new_empty(n), ids.new_empty(n), weights.new_empty(n)


@torch.library.custom_op("fastmmoe::last_token_attention", mutates_args=())
def last_token_attention(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float | None
                         ) -> torch.Tensor:
    """[B, S]: the last query's attention over all keys, averaged over heads (the layer's own q, k)."""
    return algorithm.last_token_attention(q, k, mask, scale)


@last_token_attention.register_fake
def _(q, k, mask, scale):
    return q.new_empty(q.shape[0], k.shape[2], dtype=torch.float32)


@torch.library.custom_op("fastmmoe::merge_tokens", mutates_args=())
def merge_tokens(hidden: torch.Tensor, probs: torch.Tensor | None, attn: torch.Tensor, vision_positions: torch.Tensor,
                 ratio_q: int, merge_ratio_q: int, window: int, alpha: float, strategy: str, method: str,
                 compat: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One merge/prune stage for every sample: (keep [B, S'], hidden [B, S', H], vision [B, N'])."""
    if vision_positions.shape[1] > algorithm.MAX_VISION_TOKENS:  # vision_after_stage is exact below it
        raise ValueError(f"more than {algorithm.MAX_VISION_TOKENS} vision tokens in one sample")
    outs = algorithm.merge_stage(hidden, probs, attn, vision_positions, ratio_q=ratio_q, merge_ratio_q=merge_ratio_q,
                                 window=window, alpha=alpha, strategy=strategy, method=method, compat=compat)
    return tuple(t.contiguous() for t in outs)


@merge_tokens.register_fake
def _(hidden, probs, attn, vision_positions, ratio_q, merge_ratio_q, window, alpha, strategy, method, compat=False):
    # A static N gives the exact count. A symbolic N gives unbacked sizes, bound at run time to what the
    # kernel returns (its count is the exact one): the exact count in floor divisions holds N three
    # times, so nested over k stages its expression grows as 3^k (the authors' compat count faster), and
    # at three stages Inductor's size simplification did not finish a tiny model's AOTInductor compile in
    # 20 minutes; one symbol per stage lowers it in about a minute (benchmarks/RESULTS.md). Their ranges
    # go into the program's range constraints (passes.base.record_unbacked_ranges). S' >= 1: a stage
    # keeps a token.
    batch, seq, width = hidden.shape
    n = vision_positions.shape[1]
    if isinstance(n, torch.SymInt):
        ctx = torch.library.get_ctx()
        new_n, new_seq = ctx.new_dynamic_size(), ctx.new_dynamic_size(min=1)
    else:
        new_n = algorithm.merge_vision_after(n, ratio_q, merge_ratio_q, window, compat)
        new_seq = seq - n + new_n
    return (vision_positions.new_empty(batch, new_seq), hidden.new_empty(batch, new_seq, width),
            vision_positions.new_empty(batch, new_n))


@torch.library.custom_op("fastmmoe::gather_tokens", mutates_args=())
def gather_tokens(x: torch.Tensor, keep: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """x gathered along its sequence axes `dims` by keep [B, S'] (positions, masks, ...)."""
    return algorithm.gather_tokens(x, keep, dims).clone()


@gather_tokens.register_fake
def _(x, keep, dims):
    shape = [keep.shape[0], *x.shape[1:]]
    for d in dims:
        shape[d] = keep.shape[1]
    return x.new_empty(shape)


# --- SparseVLM (docs/fastmmoe.md 5.2; sparsevlm_math) ------------------------------------

@torch.library.custom_op("fastmmoe::sparsevlm_raters", mutates_args=())
def sparsevlm_raters(embeds: torch.Tensor, vision_positions: torch.Tensor) -> torch.Tensor:
    """[B, S] float32, 1.0 at the text raters (sparsevlm_math.rater_flags)."""
    return sparsevlm_math.rater_flags(embeds, vision_positions)


@sparsevlm_raters.register_fake
def _(embeds, vision_positions):
    return embeds.new_empty(embeds.shape[:2], dtype=torch.float32)


@torch.library.custom_op("fastmmoe::rater_attention", mutates_args=())
def rater_attention(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
                    raters: torch.Tensor) -> torch.Tensor:
    """[B, S]: every key's attention from the raters, averaged over heads and raters (the layer's own q, k)."""
    return sparsevlm_math.rater_attention(q, k, mask, scale, raters)


@rater_attention.register_fake
def _(q, k, mask, scale, raters):
    return q.new_empty(q.shape[0], k.shape[2], dtype=torch.float32)


@torch.library.custom_op("fastmmoe::sparsevlm_tokens", mutates_args=())
def sparsevlm_tokens(hidden: torch.Tensor, scores: torch.Tensor, vision_positions: torch.Tensor, ratio_q: int,
                     recycle_q: int, cluster_q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One SparseVLM stage for every sample: (keep [B, S'], hidden [B, S', H], vision [B, N'])."""
    if vision_positions.shape[1] > algorithm.MAX_VISION_TOKENS:  # vision_after_stage is exact below it
        raise ValueError(f"more than {algorithm.MAX_VISION_TOKENS} vision tokens in one sample")
    outs = sparsevlm_math.sparsevlm_stage(hidden, scores, vision_positions, ratio_q, recycle_q, cluster_q)
    return tuple(t.contiguous() for t in outs)


@sparsevlm_tokens.register_fake
def _(hidden, scores, vision_positions, ratio_q, recycle_q, cluster_q):
    batch, seq, width = hidden.shape
    n = vision_positions.shape[1]
    new_n = algorithm.vision_after_stage(n, ratio_q)
    new_seq = seq - n + new_n
    return (vision_positions.new_empty(batch, new_seq), hidden.new_empty(batch, new_seq, width),
            vision_positions.new_empty(batch, new_n))


# Used by lower/ to turn the small ops into aten before Inductor sees them. merge_tokens and
# sparsevlm_tokens stay opaque ops for Inductor (the onnx lowering decomposes them: LOOP_FREE).
DECOMPOSITIONS = {
    torch.ops.fastmmoe.route_pairs.default: algorithm.all_pairs,
    torch.ops.fastmmoe.route_pairs_topkv.default: algorithm.modality_pairs,
    torch.ops.fastmmoe.last_token_attention.default: algorithm.last_token_attention,
    torch.ops.fastmmoe.gather_tokens.default: algorithm.gather_tokens,
    torch.ops.fastmmoe.sparsevlm_raters.default: sparsevlm_math.rater_flags,
    torch.ops.fastmmoe.rater_attention.default: sparsevlm_math.rater_attention,
}

# The loop-free kernels of the two selection ops, which the onnx lowering traces into the graph.
LOOP_FREE = {
    torch.ops.fastmmoe.merge_tokens.default: algorithm.merge_stage,
    torch.ops.fastmmoe.sparsevlm_tokens.default: sparsevlm_math.sparsevlm_stage,
}

# Ops the pair-counting instrumentation and FLOPs counter treat as expert GEMMs.
EXPERT_GEMM = torch.ops.fastmmoe.grouped_mm.default
