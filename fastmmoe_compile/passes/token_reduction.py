"""routing_merge (spec section 2) and fastv (the paper's baseline): token reduction inside the graph.

At each stage's decoder layer, after self-attention and its residual add, before the
MoE block, one fastmmoe::merge_tokens op takes
  - the residual stream,
  - the layer's routing distributions for every current token (the router's own
    layernorm -> linear -> softmax/sigmoid chain, cloned onto the pre-merge stream),
  - the last token's attention row, computed from the layer's own q and k (so the
    layer keeps its fused attention),
  - the current vision positions,
and returns the kept positions, the reduced stream and the new vision positions.
Everything after it that was indexed by the old sequence (rotary cos/sin, masks,
kept_positions, the vision positions of later routers) is gathered or rewired.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.export import ExportedProgram

from .. import algorithm
from ..models.base import layer_of
from .base import GraphPass, PassResult, fake_call, finish, module_path, user_input
from .routers import find_routers

SDPA = torch.ops.aten.scaled_dot_product_attention.default


@dataclass(frozen=True)
class Stage:
    layer: int
    ratio: float  # vision tokens kept by this stage
    merge_ratio: float
    window: int
    alpha: float
    strategy: str
    method: str
    use_router: bool = True  # FastV scores by attention alone


class TokenReductionError(RuntimeError):
    pass


class TokenReduction(GraphPass):
    def __init__(self, stages: list[Stage], name: str, vision_input: str = "vision_positions"):
        self.stages = stages
        self.name = name
        self.vision_input = vision_input

    def __call__(self, program: ExportedProgram) -> PassResult:
        graph = program.graph
        vision = user_input(program, self.vision_input)
        changes = []
        for stage in self.stages:
            vision, change = self._insert_stage(graph, stage, vision)
            changes.append(change)
            finish(program)  # the next stage reads the reduced shapes
        return PassResult(program, bool(changes), changes)

    def _insert_stage(self, graph: torch.fx.Graph, stage: Stage, vision: torch.fx.Node):
        nodes = [n for n in graph.nodes if layer_of(module_path(n)) == stage.layer]
        sdpa = next((n for n in nodes if n.target == SDPA), None)
        if sdpa is None:
            raise TokenReductionError(f"layer {stage.layer}: no scaled_dot_product_attention found")
        layer_path = module_path(sdpa).split(".self_attn")[0]
        residual = next((n for n in nodes if n.target == torch.ops.aten.add.Tensor and module_path(n) == layer_path
                         and _after(n, sdpa)), None)
        if residual is None:
            raise TokenReductionError(f"layer {stage.layer}: no attention residual add found")
        site = next((s for s in find_routers(graph) if s.layer == stage.layer), None)
        if stage.use_router and (site is None or site.scores is None):
            raise TokenReductionError(
                f"merge layer {stage.layer} has no routed-MoE router (a dense layer?); choose an MoE layer")

        anchor = residual.next
        new_nodes: list[torch.fx.Node] = []

        def call(op, args, like):
            with graph.inserting_before(anchor):
                node = graph.call_function(op, tuple(args))
            node.meta = {k: v for k, v in like.meta.items() if k in ("nn_module_stack", "stack_trace")}
            node.meta["val"] = fake_call(op, *args)
            new_nodes.append(node)
            return node

        q, k = sdpa.args[0], sdpa.args[1]
        mask = sdpa.kwargs.get("attn_mask", sdpa.args[3] if len(sdpa.args) > 3 else None)
        attn = call(torch.ops.fastmmoe.last_token_attention.default, (q, k, mask, sdpa.kwargs.get("scale")), sdpa)
        probs = self._clone_scores(graph, site.scores, residual, anchor, new_nodes) if stage.use_router else None
        merge = call(torch.ops.fastmmoe.merge_tokens.default,
                     (residual, probs, attn, vision, algorithm.ratio_units(stage.ratio),
                      algorithm.ratio_units(stage.merge_ratio), stage.window, stage.alpha, stage.strategy,
                      stage.method), residual)
        keep, hidden, new_vision = (call(operator.getitem, (merge, i), residual) for i in range(3))
        keep_users = set(new_nodes)
        residual.replace_all_uses_with(hidden, delete_user_cb=lambda u: u not in keep_users)
        self._rewire(graph, merge, keep, hidden, vision, new_vision, residual.meta["val"].shape[1], set(new_nodes))
        seq = residual.meta["val"].shape[1]
        return new_vision, {
            "layer": stage.layer, "ratio": round(stage.ratio, 6), "merge_ratio": stage.merge_ratio,
            "window": stage.window, "strategy": stage.strategy, "method": stage.method,
            "tokens_before": str(seq), "tokens_after": str(hidden.meta["val"].shape[1]),
        }

    @staticmethod
    def _clone_scores(graph, scores, residual, anchor, new_nodes):
        """Copy the router's chain residual -> ... -> scores so it reads the pre-merge stream."""
        order = {n: i for i, n in enumerate(graph.nodes)}
        chain, stack = set(), [scores]
        while stack:
            n = stack.pop()
            if n in chain or n.op in ("placeholder", "get_attr") or order[n] <= order[residual]:
                continue
            chain.add(n)
            stack.extend(n.all_input_nodes)
        mapping = {}
        for n in sorted(chain, key=order.__getitem__):
            with graph.inserting_before(anchor):
                copy = graph.node_copy(n, lambda a: mapping.get(a, a))
            mapping[n] = copy
            new_nodes.append(copy)
        return mapping[scores]

    @staticmethod
    def _rewire(graph, merge, keep, hidden, vision, new_vision, seq, new_nodes):
        """Every value indexed by the old sequence that is read after the merge gets gathered;
        every read of the old sequence length (export shares one size node across layers)
        reads the new one."""
        after, frontier = set(), [merge]
        while frontier:
            n = frontier.pop()
            for u in n.users:
                if u not in after:
                    after.add(u)
                    frontier.append(u)
        seq_expr = seq.node.expr if isinstance(seq, torch.SymInt) else seq
        order = {n: i for i, n in enumerate(graph.nodes)}
        for node in list(graph.nodes):
            if node in after or node in new_nodes:
                continue
            readers = [u for u in node.users if u in after and u not in new_nodes]
            if layer_of(module_path(node)) is not None:
                # A layer's own result returned as is (its KV cache) keeps the tokens that reached that layer.
                readers = [u for u in readers if u.op != "output"]
            if not readers:
                continue
            if node is vision:
                for u in readers:
                    u.replace_input_with(vision, new_vision)
                continue
            val = node.meta.get("val")
            if isinstance(val, torch.SymInt) and _same(val, seq_expr):
                with graph.inserting_after(hidden):
                    size = graph.call_function(torch.ops.aten.sym_size.int, (hidden, 1))
                size.meta["val"] = hidden.meta["val"].shape[1]
                for u in readers:
                    u.replace_input_with(node, size)
                continue
            if isinstance(val, torch.SymInt) and _mentions(val, seq_expr):
                raise TokenReductionError(f"{node.name}: a size of the pre-merge sequence is read after the merge")
            if not isinstance(val, torch.Tensor):
                continue
            dims = [i for i, d in enumerate(val.shape) if _same(d, seq_expr)]
            if not dims:
                if any(_mentions(d, seq_expr) for d in val.shape):
                    raise TokenReductionError(
                        f"{node.name} {list(val.shape)}: flattened over the pre-merge sequence and read after it")
                continue
            first = min(readers, key=order.__getitem__)
            with graph.inserting_before(first):
                gathered = graph.call_function(torch.ops.fastmmoe.gather_tokens.default, (node, keep, dims))
            gathered.meta = {k: v for k, v in first.meta.items() if k in ("nn_module_stack", "stack_trace")}
            gathered.meta["val"] = fake_call(torch.ops.fastmmoe.gather_tokens.default, node, keep, dims)
            for u in readers:
                u.replace_input_with(node, gathered)


def _same(d, expr) -> bool:
    return (d.node.expr if isinstance(d, torch.SymInt) else d) == expr


def _mentions(d, expr) -> bool:
    """d's size expression involves the sequence length (checkable when it is a plain symbol)."""
    if not isinstance(d, torch.SymInt):
        return False
    return d.node.expr == expr or (getattr(expr, "is_Symbol", False) and expr in d.node.expr.free_symbols)


def _after(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    n = b.next
    while n.op != "root":
        if n is a:
            return True
        n = n.next
    return False
