"""modality_topk (docs/fastmmoe.md section 1): vision tokens keep their Kv highest-weight experts.

In every MoE layer where vision tokens keep fewer experts (Kv < K: FastMMoEConfig.vision_experts,
the layers >= reduce_from_layer), the router's pair list
    route_pairs(weights, ids)                         -> T*K pairs
becomes
    route_pairs_topkv(weights, ids, vision_positions, kv) -> (T - B*N)*K + B*N*kv pairs
and the dispatch downstream, whose cost follows its pair count, never sees the
dropped pairs. Kept weights are rescaled per docs/fastmmoe.md (algorithm.keep_top_experts).
"""
from __future__ import annotations

import torch
from torch.export import ExportedProgram

from .base import (GraphPass, PassResult, finish, first_changed, first_node_after_layer, insert_call, snapshot,
                   vision_input)
from .routers import find_routers


class ModalityTopK(GraphPass):
    name = "modality_topk"

    def __init__(self, experts_at, fresh_until_layer: int | None = None):
        # (layer, top_k) -> experts per vision token there (FastMMoEConfig.vision_experts): the rule of which
        # layers reduce lives there, read by this pass and the FLOPs count alike.
        self.experts_at = experts_at
        # A token-reduction pass that follows refreshes the fake values from its first stage's layer to
        # the end (passes/base.finish), so this pass refreshes only up to the end of that layer.
        self.fresh_until_layer = fresh_until_layer

    def __call__(self, program: ExportedProgram) -> PassResult:
        graph = program.graph
        vision = vision_input(program)
        changes, before = [], snapshot(graph)
        for site in find_routers(graph):
            if site.route.target != torch.ops.fastmmoe.route_pairs.default:
                continue
            kv = self.experts_at(site.layer, site.top_k)
            if kv >= site.top_k:  # Kv == K is the unmodified model: leave the graph alone
                continue
            new = insert_call(graph, torch.ops.fastmmoe.route_pairs_topkv.default, (site.weights, site.ids, vision),
                              dict(kv=kv), before=site.route, like=site.route)
            site.route.replace_all_uses_with(new)
            graph.erase_node(site.route)
            changes.append({"layer": site.layer, "router": site.router_path, "top_k": site.top_k, "kv": kv})
        if changes:
            until = self.fresh_until_layer
            finish(program, first_changed(graph, before), None if until is None else first_node_after_layer(graph, until))
        return PassResult(program, bool(changes), changes)
