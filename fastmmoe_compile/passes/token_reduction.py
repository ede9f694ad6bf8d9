"""routing_merge (docs/fastmmoe.md section 2) and fastv (the paper's baseline): token reduction inside the graph.

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

from ..config import ConfigError, MergeStage
from .base import (GraphPass, PassResult, finish, first_changed, first_node_after_layer, insert_call, insert_copies,
                   layer_of, module_path, snapshot, vision_input)
from .routers import find_routers

SDPA = torch.ops.aten.scaled_dot_product_attention.default


class TokenReductionError(RuntimeError):
    """The graph lacks what a stage rewrites (its attention, residual add or router)."""


class MergeLayerError(ConfigError, TokenReductionError):
    """A merge layer the model cannot merge at: a dense layer, with no router to score tokens by
    (bad configuration, not a compiler bug)."""


class TokenReduction(GraphPass):
    """One pass per method (routing_merge, fastv): a stage after another, each reading the
    shapes the previous one left.

    A method whose stages reduce tokens by another op with the fastmmoe::merge_tokens contract (kept
    positions, reduced stream, new vision positions; SparseVLM) subclasses it and overrides the public
    hooks: begin (once, before the first stage), insert_stage (a stage's scores and op),
    end_stage (after a stage is rewired) and describe (a stage's entry in the changes)."""

    def __init__(self, stages: tuple, name: str):
        self.stages = stages
        self.name = name

    def __call__(self, program: ExportedProgram) -> PassResult:
        graph = program.graph
        vision = vision_input(program)
        before = snapshot(graph)
        self.begin(graph, vision)
        changes = []
        for i, stage in enumerate(self.stages):
            if i:
                before = snapshot(graph)
            anchors = locate_anchors(graph, stage)
            seq = anchors.residual.meta["val"].shape[1]
            merge = self.insert_stage(graph, anchors, stage, vision)
            rewire(graph, anchors.residual, merge, vision)
            self.end_stage(graph, stage, merge)
            vision = merge.vision
            changes.append({**self.describe(stage), "tokens_before": str(seq),
                            "tokens_after": str(merge.hidden.meta["val"].shape[1])})
            # The next stage reads the reduced shapes up to its own layer; the last one refreshes the rest.
            later = self.stages[i + 1].layer if i + 1 < len(self.stages) else None
            finish(program, first_changed(graph, before),
                   first_node_after_layer(graph, later) if later is not None else None)
        return PassResult(program, bool(changes), changes)

    def begin(self, graph: torch.fx.Graph, vision: torch.fx.Node) -> None:
        """Hook: what the pass inserts once, before the first stage (nothing here)."""

    def insert_stage(self, graph: torch.fx.Graph, anchors: Anchors, stage, vision: torch.fx.Node) -> Merge:
        """Hook: a stage's scores and reduction op right after the residual add (insert_merge here),
        its outputs as a Merge. Later layers still read the old stream until rewire()."""
        return insert_merge(graph, anchors, stage, vision)

    def end_stage(self, graph: torch.fx.Graph, stage, merge: Merge) -> None:
        """Hook: what a stage adds after it is rewired (nothing here)."""

    def describe(self, stage) -> dict:
        """Hook: the stage's settings in its entry of the pass's changes (the token counts follow)."""
        return {"layer": stage.layer, "ratio": round(stage.ratio, 6), "merge_ratio": stage.merge_ratio,
                "window": stage.window, "strategy": stage.strategy, "method": stage.method}


@dataclass
class Anchors:
    """Where a stage hooks into its layer."""
    sdpa: torch.fx.Node  # the layer's attention: its q, k and mask give the last-token scores
    residual: torch.fx.Node  # attention output + residual: the stream the merge reduces
    scores: torch.fx.Node | None  # the router's probabilities (None when the stage needs no router)

    def attention_args(self) -> tuple:
        """(q, k, mask, scale) of the layer's attention: what its scoring ops read."""
        sdpa = self.sdpa
        mask = sdpa.kwargs.get("attn_mask", sdpa.args[3] if len(sdpa.args) > 3 else None)
        return sdpa.args[0], sdpa.args[1], mask, sdpa.kwargs.get("scale")


@dataclass
class Merge:
    """The merge op and its three outputs."""
    op: torch.fx.Node
    keep: torch.fx.Node  # [B, S'] kept positions
    hidden: torch.fx.Node  # [B, S', H] reduced stream
    vision: torch.fx.Node  # [B, N'] vision positions in the reduced sequence

    @classmethod
    def outputs(cls, graph: torch.fx.Graph, op: torch.fx.Node, before: torch.fx.Node, like: torch.fx.Node
                ) -> Merge:
        """op's three outputs (getitem), inserted before `before` with `like`'s meta."""
        keep, hidden, vision = (insert_call(graph, operator.getitem, (op, i), before=before, like=like)
                                for i in range(3))
        return cls(op, keep, hidden, vision)


def locate_anchors(graph: torch.fx.Graph, stage) -> Anchors:
    """Stage `stage`'s (a MergeStage, or any stage with .layer and .use_router) anchors in its layer."""
    nodes = [n for n in graph.nodes if layer_of(module_path(n)) == stage.layer]
    sdpa = next((n for n in nodes if n.target == SDPA), None)
    if sdpa is None:
        raise TokenReductionError(f"layer {stage.layer}: no scaled_dot_product_attention found")
    layer_path = module_path(sdpa).split(".self_attn")[0]
    residual = next((n for n in nodes if n.target == torch.ops.aten.add.Tensor and module_path(n) == layer_path
                     and _after(n, sdpa)), None)
    if residual is None:
        raise TokenReductionError(f"layer {stage.layer}: no attention residual add found")
    if not stage.use_router:
        return Anchors(sdpa, residual, None)
    site = next((s for s in find_routers(graph) if s.layer == stage.layer), None)
    if site is None or site.scores is None:
        raise MergeLayerError(
            f"merge layer {stage.layer} has no routed-MoE router (a dense layer?); choose an MoE layer")
    return Anchors(sdpa, residual, site.scores)


def insert_scores(graph: torch.fx.Graph, anchors: Anchors) -> tuple[torch.fx.Node | None, torch.fx.Node]:
    """Right after the residual add: the stage's routing distributions (None for FastV) and the
    last token's attention row, from the layer's own q, k and mask (its attention stays fused)."""
    at = anchors.residual.next
    attn = insert_call(graph, torch.ops.fastmmoe.last_token_attention.default, anchors.attention_args(), before=at,
                       like=anchors.sdpa)
    probs = clone_router(graph, anchors.scores, anchors.residual, at) if anchors.scores is not None else None
    return probs, attn


def insert_merge(graph: torch.fx.Graph, anchors: Anchors, stage: MergeStage, vision: torch.fx.Node) -> Merge:
    """The stage's scores, then fastmmoe::merge_tokens and its outputs. Later layers still read
    the old stream until rewire()."""
    at, residual = anchors.residual.next, anchors.residual  # inserting before `at` keeps it the anchor
    probs, attn = insert_scores(graph, anchors)
    op = insert_call(graph, torch.ops.fastmmoe.merge_tokens.default, (residual, probs, attn, vision),
                     stage.kernel_settings(), before=at, like=residual)
    return Merge.outputs(graph, op, before=at, like=residual)


def clone_router(graph: torch.fx.Graph, scores: torch.fx.Node, residual: torch.fx.Node, at: torch.fx.Node):
    """Copy the router's chain residual -> ... -> scores so it scores the pre-merge stream
    (the router itself will read the reduced one)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    chain, stack = set(), [scores]
    while stack:
        n = stack.pop()
        if n in chain or n.op in ("placeholder", "get_attr") or order[n] <= order[residual]:
            continue
        chain.add(n)
        stack.extend(n.all_input_nodes)
    return insert_copies(graph, sorted(chain, key=order.__getitem__), before=at)[scores]


def rewire(graph: torch.fx.Graph, residual: torch.fx.Node, merge: Merge, vision: torch.fx.Node) -> None:
    """Everything after the merge reads the reduced sequence: the stream itself, the vision
    positions, the sequence length (export shares one size node across layers), and every value
    indexed by the old sequence (gathered by the kept positions)."""
    inserted = _between(residual, merge.vision.next)  # the stage's own nodes read the old stream
    residual.replace_all_uses_with(merge.hidden, delete_user_cb=lambda u: u not in inserted)
    seq = residual.meta["val"].shape[1]
    seq_expr = seq.node.expr if isinstance(seq, torch.SymInt) else seq
    after = _downstream(merge.op)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node in after or node in inserted:
            continue
        readers = [u for u in node.users if u in after and u not in inserted]
        if layer_of(module_path(node)) is not None:
            # A layer's own result returned as is (its KV cache) keeps the tokens that reached that layer.
            readers = [u for u in readers if u.op != "output"]
        if not readers:
            continue
        replacement = (merge.vision if node is vision
                       else _reduced(graph, node, merge, seq_expr, first=min(readers, key=order.__getitem__)))
        if replacement is None:
            continue
        for u in readers:
            u.replace_input_with(node, replacement)


def _reduced(graph, node, merge: Merge, seq_expr, first: torch.fx.Node) -> torch.fx.Node | None:
    """What a read of `node` after the merge reads instead (None: it does not depend on the sequence)."""
    val = node.meta.get("val")
    if isinstance(val, torch.SymInt) and _same(val, seq_expr):
        return insert_call(graph, torch.ops.aten.sym_size.int, (merge.hidden, 1), after=merge.hidden)
    if isinstance(val, torch.SymInt) and _mentions(val, seq_expr):
        raise TokenReductionError(f"{node.name}: a size of the pre-merge sequence is read after the merge")
    if not isinstance(val, torch.Tensor):
        return None
    dims = [i for i, d in enumerate(val.shape) if _same(d, seq_expr)]
    if not dims:
        if any(_mentions(d, seq_expr) for d in val.shape):
            raise TokenReductionError(
                f"{node.name} {list(val.shape)}: flattened over the pre-merge sequence and read after it")
        return None
    return insert_call(graph, torch.ops.fastmmoe.gather_tokens.default, (node, merge.keep, dims), before=first,
                       like=first)


def _downstream(node: torch.fx.Node) -> set[torch.fx.Node]:
    """Every node that reads `node`, directly or not."""
    seen, frontier = set(), [node]
    while frontier:
        for u in frontier.pop().users:
            if u not in seen:
                seen.add(u)
                frontier.append(u)
    return seen


def _between(first: torch.fx.Node, end: torch.fx.Node) -> set[torch.fx.Node]:
    """The nodes after `first` and before `end`, in the graph's order."""
    out, n = set(), first.next
    while n is not end:
        out.add(n)
        n = n.next
    return out


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
