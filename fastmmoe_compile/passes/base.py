"""Pass infrastructure: a pass takes an ExportedProgram, edits its graph in place,
and returns a PassResult saying whether it changed anything and what."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch.export import ExportedProgram

from ..torch_compat import fake_propagation


@dataclass
class PassResult:
    """torch.fx's PassResult (graph_module, modified), holding the ExportedProgram instead: a
    pass that replaces an output must also rename it in the program's signature."""
    program: ExportedProgram
    modified: bool
    changes: list[dict] = field(default_factory=list)  # one entry per rewritten site


class GraphPass:
    """A pass: a named callable, program -> PassResult (torch.fx's PassBase contract)."""
    name = "pass"

    def __call__(self, program: ExportedProgram) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError


def module_path(node: torch.fx.Node) -> str:
    """FQN of the innermost module that produced `node` ("" for graph-level nodes)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


# Decoder-layer index in a module path, e.g. "lm.model.layers.7.mlp.gate".
LAYER_PATTERN = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def layer_of(path: str) -> int | None:
    """The decoder layer a module path (module_path) lies in, None outside the decoder layers."""
    m = LAYER_PATTERN.search(path)
    return int(m.group(1)) if m else None


def vision_input(program: ExportedProgram) -> torch.fx.Node:
    """The backbone's vision_positions input (export/capture.py), which the passes wire in."""
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name == "vision_positions":
            return node
    raise KeyError("the exported program has no input named 'vision_positions'")


def fake_call(op, *args, **kwargs):
    """Run `op` on the fake values of node args: the meta['val'] of a new node."""
    def val(a):
        return a.meta["val"] if isinstance(a, torch.fx.Node) else a

    with fake_propagation():
        return op(*[val(a) for a in args], **{k: val(v) for k, v in kwargs.items()})


# Meta a new node takes from the node it stands in for: where it sits (module path, source line).
# Not source_fn_stack: that names the source function of the original node, which the new one isn't.
COPIED_META = ("nn_module_stack", "stack_trace")


def insert_call(graph: torch.fx.Graph, op, args=(), settings: dict | None = None, *, before: torch.fx.Node | None = None,
                after: torch.fx.Node | None = None, like: torch.fx.Node | None = None) -> torch.fx.Node:
    """The one way a pass adds a call: op(*args, **settings), before `before` or after `after`,
    with meta (module path) from `like` and its fake value computed.

    Settings come by name and are laid out in the op's schema order: the graph keeps positional
    arguments, as torch.export writes them, so the graph diff and saved programs read as before."""
    args = tuple(args)
    if settings:
        schema = op._schema.arguments[len(args):]
        names = [a.name for a in schema]
        required = {a.name for a in schema if not a.has_default_value()}
        if not required <= set(settings) <= set(names):
            raise TypeError(f"{op}: settings {sorted(settings)} do not match the schema's {names}")
        # Arguments left out keep their defaults; trailing ones are not written at all, so a graph that
        # does not use an optional setting reads as it did before the setting existed.
        last = max(i for i, n in enumerate(names) if n in settings)
        args += tuple(settings[n] if n in settings else schema[i].default_value for i, n in enumerate(names[:last + 1]))
    with graph.inserting_before(before) if before is not None else graph.inserting_after(after):
        node = graph.call_function(op, args)
    node.meta = {k: v for k, v in like.meta.items() if k in COPIED_META} if like is not None else {}
    node.meta["val"] = fake_call(op, *args)
    _bind_unbacked_sizes(node)
    return node


def _bind_unbacked_sizes(node: torch.fx.Node) -> None:
    """Record the unbacked sizes a new node's fake value created (a data-dependent token count), as
    torch.export does, so that later fake propagation rebinds them instead of finding them pending."""
    from torch._guards import detect_fake_mode
    from torch.fx.experimental.symbolic_shapes import compute_unbacked_bindings

    mode = detect_fake_mode(node.meta["val"] if isinstance(node.meta["val"], tuple) else (node.meta["val"],))
    if mode is not None and mode.shape_env is not None:
        bindings = compute_unbacked_bindings(mode.shape_env, node.meta["val"])
        if bindings:
            node.meta["unbacked_bindings"] = bindings


def insert_copies(graph: torch.fx.Graph, nodes: list[torch.fx.Node], before: torch.fx.Node) -> dict:
    """Copies of `nodes` (in graph order) before `before`, reading each other's copies: {original: copy}."""
    mapping = {}
    for n in nodes:
        with graph.inserting_before(before):
            mapping[n] = graph.node_copy(n, lambda a: mapping.get(a, a))
    return mapping


def finish(program: ExportedProgram, changed_from: torch.fx.Node | None = None,
           fresh_until: torch.fx.Node | None = None) -> None:
    """Check and recompile the graph, then refresh every node's fake value: shapes
    downstream of a rewrite (pair counts, reduced sequences) must be the new ones.

    changed_from: the first node (in graph order) the rewrite added or changed (snapshot /
    first_changed); the nodes before it keep their values. fresh_until: the refresh stops there,
    leaving that node and the rest stale for a later finish() that starts at or before them (a
    multi-stage pass refreshes only up to its next stage's layer, then once to the end). Fake
    propagation over a 48-layer backbone takes tens of seconds a run, so each stage refreshing the
    whole graph made the passes minutes long."""
    # No global dead-code elimination: it would also drop nodes the export left
    # dead, and the graph diff must show only what the passes did.
    gm = program.graph_module
    gm.graph.lint()
    gm.recompile()
    refresh_fake_values(gm, changed_from, fresh_until)
    record_unbacked_ranges(program)
    sync_output_names(program)


def record_unbacked_ranges(program: ExportedProgram) -> None:
    """Give the program's range constraints the value range of every unbacked size its graph's values
    mention (data-dependent token counts the passes introduced), as torch.export does for its own:
    without them torch.export.load cannot rebuild those shapes ("KeyError: u1")."""
    from torch._guards import detect_fake_mode
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    vals = [n.meta.get("val") for n in program.graph.nodes]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if mode is None or mode.shape_env is None:
        return
    ranges = mode.shape_env.var_to_range
    for sym in free_unbacked_symbols([v for v in vals if v is not None]):
        if sym not in program.range_constraints and sym in ranges:
            program.range_constraints[sym] = ranges[sym]


def snapshot(graph: torch.fx.Graph) -> dict:
    """What first_changed compares against: each node's inputs."""
    return {n: (n.args, n.kwargs) for n in graph.nodes}


def first_changed(graph: torch.fx.Graph, before: dict) -> torch.fx.Node | None:
    """The first node, in graph order, that is new since `before` (snapshot) or reads other inputs."""
    for n in graph.nodes:
        if n not in before or before[n] != (n.args, n.kwargs):
            return n
    return None


def first_node_after_layer(graph: torch.fx.Graph, layer: int) -> torch.fx.Node | None:
    """The first node of a decoder layer after `layer` (None: there is none, e.g. the last layer)."""
    seen = False
    for n in graph.nodes:
        at = layer_of(module_path(n))
        if at == layer:
            seen = True
        elif seen and at is not None and at > layer:
            return n
    return None


def sync_output_names(program: ExportedProgram) -> None:
    """The signature names each output by its node: a pass that replaces an output (the merge
    gathers kept_positions) must rename it there too, or torch.export.save's verifier refuses
    the program."""
    output = next(n for n in reversed(program.graph.nodes) if n.op == "output")
    for spec, node in zip(program.graph_signature.output_specs, output.args[0]):
        if isinstance(node, torch.fx.Node) and getattr(spec.arg, "name", node.name) != node.name:
            spec.arg = type(spec.arg)(name=node.name)


def refresh_fake_values(gm: torch.fx.GraphModule, start: torch.fx.Node | None = None,
                        stop: torch.fx.Node | None = None) -> None:
    """Recompute node.meta["val"] by fake propagation, from `start` (None: the first node) up to,
    not including, `stop` (None: to the end); the other nodes' values are read as they are."""
    from torch._guards import detect_fake_mode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    class _Range(FakeTensorProp):
        active = start is None

        def run_node(self, n):
            if n is start:
                self.active = True
            if n is stop:
                self.active = False
            if not self.active and n.op != "output" and "val" in n.meta:
                return n.meta["val"]
            return super().run_node(n)

    inputs = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode([v for v in inputs if isinstance(v, torch.Tensor)])
    with fake_propagation():
        _Range(gm, mode).propagate_dont_convert_inputs(*inputs)
