"""sparsevlm: the SparseVLM baseline (arXiv 2410.04417; docs/fastmmoe.md 5.2) as a graph pass.

Once, before the first decoder layer: fastmmoe::sparsevlm_raters picks the text raters from the
backbone's input embeddings ([B, S] flags). At each stage's decoder layer, after self-attention and
its residual add, before the MLP / MoE block (where a FastV or FastMMoE stage sits):
  - fastmmoe::rater_attention: every token's attention from the raters, from the layer's own q, k
    and mask (the layer keeps its fused attention);
  - fastmmoe::sparsevlm_tokens: keep / recycle (the fastmmoe::merge_tokens contract: kept positions,
    reduced stream, new vision positions).
Everything after it that was indexed by the old sequence is gathered by the kept positions
(token_reduction.rewire), the rater flags included, for the next stage.
"""
from __future__ import annotations

import torch

from ..config import SparseVLMStage
from .base import insert_call
from .token_reduction import Anchors, Merge, TokenReduction


class SparseVLM(TokenReduction):
    """TokenReduction's stages with SparseVLM's rating and op, through its public hooks."""

    def __init__(self, stages: tuple[SparseVLMStage, ...]):
        super().__init__(stages, name="sparsevlm")
        self._raters: torch.fx.Node | None = None

    def begin(self, graph: torch.fx.Graph, vision: torch.fx.Node) -> None:
        """The text raters, once, from the input embeddings, before the first node."""
        embeds = next(n for n in graph.nodes if n.op == "placeholder" and n.name == "inputs_embeds")
        start = next(n for n in graph.nodes if n.op != "placeholder")
        self._raters = insert_call(graph, torch.ops.fastmmoe.sparsevlm_raters.default, (embeds, vision), before=start)

    def insert_stage(self, graph: torch.fx.Graph, anchors: Anchors, stage: SparseVLMStage,
                     vision: torch.fx.Node) -> Merge:
        at, residual = anchors.residual.next, anchors.residual
        scores = insert_call(graph, torch.ops.fastmmoe.rater_attention.default,
                             (*anchors.attention_args(), self._raters), before=at, like=anchors.sdpa)
        op = insert_call(graph, torch.ops.fastmmoe.sparsevlm_tokens.default, (residual, scores, vision),
                         stage.kernel_settings(), before=at, like=residual)
        return Merge.outputs(graph, op, before=at, like=residual)

    def end_stage(self, graph: torch.fx.Graph, stage: SparseVLMStage, merge: Merge) -> None:
        if stage is not self.stages[-1]:
            # The next stage reads the raters of the reduced sequence (inserted after rewire, which
            # would otherwise gather this read a second time).
            self._raters = insert_call(graph, torch.ops.fastmmoe.gather_tokens.default, (self._raters, merge.keep, [1]),
                                       after=merge.vision, like=merge.hidden)

    def describe(self, stage: SparseVLMStage) -> dict:
        return {"layer": stage.layer, "ratio": round(stage.ratio, 6), "recycle_ratio": stage.recycle_ratio,
                "cluster_ratio": stage.cluster_ratio}
