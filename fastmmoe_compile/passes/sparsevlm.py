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

import operator

import torch
from torch.export import ExportedProgram

from ..config import SparseVLMStage
from .base import (GraphPass, PassResult, finish, first_changed, first_node_after_layer, insert_call, snapshot,
                   vision_input)
from .token_reduction import Merge, locate_anchors, rewire


class SparseVLM(GraphPass):
    name = "sparsevlm"

    def __init__(self, stages: tuple[SparseVLMStage, ...]):
        self.stages = stages

    def __call__(self, program: ExportedProgram) -> PassResult:
        graph = program.graph
        vision = vision_input(program)
        before = snapshot(graph)
        embeds = next(n for n in graph.nodes if n.op == "placeholder" and n.name == "inputs_embeds")
        start = next(n for n in graph.nodes if n.op != "placeholder")
        raters = insert_call(graph, torch.ops.fastmmoe.sparsevlm_raters.default, (embeds, vision), before=start)
        changes = []
        for i, stage in enumerate(self.stages):
            if i:
                before = snapshot(graph)
            anchors = locate_anchors(graph, stage)
            residual, sdpa, at = anchors.residual, anchors.sdpa, anchors.residual.next
            seq = residual.meta["val"].shape[1]
            mask = sdpa.kwargs.get("attn_mask", sdpa.args[3] if len(sdpa.args) > 3 else None)
            scores = insert_call(graph, torch.ops.fastmmoe.rater_attention.default,
                                 (sdpa.args[0], sdpa.args[1], mask, sdpa.kwargs.get("scale"), raters),
                                 before=at, like=sdpa)
            op = insert_call(graph, torch.ops.fastmmoe.sparsevlm_tokens.default, (residual, scores, vision),
                             stage.kernel_settings(), before=at, like=residual)
            keep, hidden, new_vision = (insert_call(graph, operator.getitem, (op, i), before=at, like=residual)
                                        for i in range(3))
            merge = Merge(op, keep, hidden, new_vision)
            rewire(graph, residual, merge, vision)
            if stage is not self.stages[-1]:
                # The next stage reads the raters of the reduced sequence (inserted after rewire, which
                # would otherwise gather this read a second time).
                raters = insert_call(graph, torch.ops.fastmmoe.gather_tokens.default, (raters, keep, [1]),
                                     after=new_vision, like=residual)
            vision = new_vision
            changes.append({"layer": stage.layer, "ratio": round(stage.ratio, 6),
                            "recycle_ratio": stage.recycle_ratio, "cluster_ratio": stage.cluster_ratio,
                            "tokens_before": str(seq), "tokens_after": str(hidden.meta["val"].shape[1])})
            later = self.stages[i + 1].layer if i + 1 < len(self.stages) else None
            finish(program, first_changed(graph, before),
                   first_node_after_layer(graph, later) if later is not None else None)
        return PassResult(program, bool(changes), changes)
