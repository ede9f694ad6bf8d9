"""find_routers: one RouterSite per routed-MoE layer of an exported backbone.

Anchors are module paths (nn_module_stack) plus the op pattern, never node names:
the pair-routing op inside `<layer>.mlp.experts`, whose weights/ids inputs come
from the router module; inside that module, its scoring op and its top-k.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import layer_of, module_path

ROUTE_OPS = (torch.ops.fastmmoe.route_pairs.default, torch.ops.fastmmoe.route_pairs_topkv.default)
SCORE_OPS = (torch.ops.aten.softmax.int, torch.ops.aten._softmax.default, torch.ops.aten.sigmoid.default)


@dataclass
class RouterSite:
    layer: int
    router_path: str  # e.g. "lm.model.layers.5.mlp.gate"
    route: torch.fx.Node  # fastmmoe.route_pairs[_topkv](weights, ids, ...)
    weights: torch.fx.Node  # final top-K weights [T, K] (normalised / scaled as the model does)
    ids: torch.fx.Node  # top-K expert ids [T, K]
    scores: torch.fx.Node | None  # router probabilities over all experts [T, E]

    @property
    def top_k(self) -> int:
        return int(self.weights.meta["val"].shape[-1])


def find_routers(graph: torch.fx.Graph) -> list[RouterSite]:
    by_path: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        by_path.setdefault(module_path(node), []).append(node)
    sites = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in ROUTE_OPS:
            continue
        weights, ids = node.args[0], node.args[1]
        router_path = module_path(weights)
        layer = layer_of(module_path(node))
        if layer is None:
            raise RuntimeError(f"routing op {node.name} is outside any decoder layer ({module_path(node)!r})")
        router_nodes = by_path.get(router_path, [])
        scores = next((n for n in router_nodes if n.op == "call_function" and n.target in SCORE_OPS), None)
        sites.append(RouterSite(layer, router_path, node, weights, ids, scores))
    return sorted(sites, key=lambda s: s.layer)
