"""A stable, human-readable graph diff: what the passes added, removed or reshaped, per layer.

Graphs are summarised (op counts per decoder layer, and the signature of every
fastmmoe op with its shapes written in the input dims B, S, N) before and after
the passes; the diff of the summaries is what `fastmmoe-compile diff` prints and
what the golden files in tests/golden guard. Node names never appear: they change
between torch versions, the ops and shapes that matter do not.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import sympy
import torch
from torch.export import ExportedProgram

from .. import algorithm
from .base import layer_of, module_path

DIM_NAMES = {("inputs_embeds", 0): "B", ("inputs_embeds", 1): "S", ("vision_positions", 1): "N"}


@dataclass
class GraphSummary:
    ops: dict[str, Counter] = field(default_factory=dict)  # layer label -> op name -> count
    calls: dict[str, list[str]] = field(default_factory=dict)  # layer label -> fastmmoe op signatures


def summarize(program: ExportedProgram) -> GraphSummary:
    names = _symbol_names(program)
    summary = GraphSummary()
    stage_names = _stage_names(program, names)
    if stage_names:
        summary.calls["definitions"] = [f"{name} = {expr}" for name, expr in stage_names]
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        layer = layer_of(module_path(node))
        label = f"layer {layer}" if layer is not None else "outside layers"
        op = _op_name(node.target)
        summary.ops.setdefault(label, Counter())[op] += 1
        if op.startswith("fastmmoe."):
            summary.calls.setdefault(label, []).append(_signature(node, op, names))
    return summary


def diff(before: GraphSummary, after: GraphSummary) -> str:
    """Per-layer changes, with runs of identical layers folded into one entry."""
    entries: list[tuple[list[str], list[str]]] = []
    if after.calls.get("definitions"):
        entries.append((["where"], [f"  {d}" for d in after.calls["definitions"]]))
    for label in _ordered(set(before.ops) | set(after.ops)):
        b_ops, a_ops = before.ops.get(label, Counter()), after.ops.get(label, Counter())
        lines = []
        for op in sorted(set(b_ops) | set(a_ops)):
            delta = a_ops[op] - b_ops[op]
            if delta:
                lines.append(f"  {'+' if delta > 0 else '-'} {abs(delta)} x {op}")
        b_calls, a_calls = before.calls.get(label, []), after.calls.get(label, [])
        if b_calls != a_calls:
            lines += [f"  before: {c}" for c in b_calls if c not in a_calls]
            lines += [f"  after:  {c}" for c in a_calls if c not in b_calls]
        if lines:
            if entries and entries[-1][1] == lines and _next_layer(entries[-1][0][-1], label):
                entries[-1][0].append(label)
            else:
                entries.append(([label], lines))
    if not entries:
        return "no changes\n"
    out = []
    for labels, lines in entries:
        head = labels[0] if len(labels) == 1 else f"layers {labels[0].split()[-1]}-{labels[-1].split()[-1]}"
        out.append(f"{head}:")
        out.extend(lines)
    return "\n".join(out) + "\n"


def _stage_names(program, names) -> list[tuple[str, str]]:
    """Name the vision and sequence counts after each merge stage N1, S1, N2, S2, ...:
    the graph carries them as floor-division formulas, and every later shape uses them."""
    defs = []
    previous_n = "N"
    for node in program.graph.nodes:
        if node.target in (torch.ops.fastmmoe.merge_tokens.default, torch.ops.fastmmoe.sparsevlm_tokens.default):
            keep, _, vision = node.meta["val"]
            i = len(defs) // 2 + 1
            ratio = _argument(node, "ratio_q") / algorithm.RATIO_SCALE
            n_label, s_label = f"N{i}", f"S{i}"
            if node.target is torch.ops.fastmmoe.merge_tokens.default and len(node.args) > 10 and node.args[10]:
                defs.append((n_label, f"the authors' count of {previous_n} at r = {ratio:g} (docs/fastmmoe.md 2.11)"))
            else:
                defs.append((n_label, f"min({previous_n}, max(1, floor({previous_n} * {ratio:g})))"))
            before_s = _shape_dim(node.args[0].meta["val"].shape[1], names)
            defs.append((s_label, f"{before_s} - {previous_n} + {n_label}"))
            for label, dim in ((n_label, vision.shape[1]), (s_label, keep.shape[1])):
                if isinstance(dim, torch.SymInt):
                    names[dim.node.expr] = sympy.Symbol(label, integer=True, positive=True)
            previous_n = n_label
    return defs


def _argument(node: torch.fx.Node, name: str):
    """An op node's argument by its schema name (the graph holds them positionally)."""
    names = [a.name for a in node.target._schema.arguments]
    return node.kwargs[name] if name in node.kwargs else node.args[names.index(name)]


def _shape_dim(d, names) -> str:
    return str(sympy.expand(_substitute(d.node.expr, names))) if isinstance(d, torch.SymInt) else str(d)


def _op_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        ns, name = target.name().split("::")
        return f"{ns}.{name.split('.')[0]}" if ns == "fastmmoe" else f"{ns}.{name}"
    return getattr(target, "__name__", str(target))


def _signature(node, op: str, names) -> str:
    args = []
    for a in node.args:
        if isinstance(a, torch.fx.Node):
            args.append(_shape(a.meta.get("val"), names))
        else:
            args.append(repr(a))
    val = node.meta.get("val")
    out = ", ".join(_shape(v, names) for v in val) if isinstance(val, (tuple, list)) else _shape(val, names)
    return f"{op}({', '.join(args)}) -> {out}"


def _shape(val, names) -> str:
    if not isinstance(val, torch.Tensor):
        return "?"
    dims = []
    for d in val.shape:
        if isinstance(d, torch.SymInt):
            dims.append(_shape_dim(d, names))
        else:
            dims.append(str(d))
    return "[" + ", ".join(dims) + "]"


def _substitute(expr, names: dict):
    """Replace input symbols and whole stage-count subexpressions by their names."""
    compound = {k: v for k, v in names.items() if not k.is_Symbol}
    expr = expr.xreplace(compound) if compound else expr
    return expr.xreplace({k: v for k, v in names.items() if k.is_Symbol})


def _symbol_names(program: ExportedProgram) -> dict:
    names = {}
    for node in program.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        for i, d in enumerate(getattr(val, "shape", ())):
            label = DIM_NAMES.get((node.name, i))
            if label and isinstance(d, torch.SymInt) and isinstance(d.node.expr, sympy.Symbol):
                names[d.node.expr] = sympy.Symbol(label, integer=True, positive=True)
    return names


def _ordered(labels):
    def key(label):
        return (0, int(label.split()[-1])) if label.startswith("layer ") else (1, 0)

    return sorted(labels, key=key)


def _next_layer(prev: str, label: str) -> bool:
    return prev.startswith("layer ") and label.startswith("layer ") and int(label.split()[-1]) == int(prev.split()[-1]) + 1
