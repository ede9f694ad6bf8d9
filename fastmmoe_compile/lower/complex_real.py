"""Complex tensors as real pairs, for lowerings without complex types (ONNX).

DeepSeek-V2's rotary embedding (transformers' DeepseekV2RotaryEmbedding + apply_rotary_emb) is
complex: freqs_cis = polar(1, position * inv_freq), then
view_as_real(view_as_complex(q as pairs) * freqs_cis). ONNX has no complex type, so before
torch.onnx.export every complex value z [...] of the program becomes the real tensor
view_as_real(z) [..., 2] (real, imaginary), and each op on it the same arithmetic on pairs:
    polar(r, a)           -> stack(r cos a, r sin a)
    (a + bi)(c + di)      -> stack(ac - bd, ad + bc)      (what a complex multiply computes)
    view_as_complex(x)    -> x;  view_as_real(z) -> z's pair tensor
    unsqueeze/expand/gather/slice/select/view/clone/cat -> the same op with the pair axis kept last.
The passes' gathers of the rotary table along the sequence (a merge) are such gathers. Only the
graph handed to ONNX changes: other backends keep the program as exported. A complex op outside
this list is an error naming it.
"""
from __future__ import annotations

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from ..errors import UnsupportedModelError

aten = torch.ops.aten


class ComplexOpError(UnsupportedModelError):
    """A complex-valued op this translation does not know."""


def _complex(x) -> bool:
    v = x.meta.get("val") if isinstance(x, Node) else None
    return isinstance(v, torch.Tensor) and v.is_complex()


def _dim(d: int) -> int:
    """A dim of the complex tensor as a dim of its pair tensor (one more axis, last)."""
    return d if d >= 0 else d - 1


class _Builder:
    def __init__(self, graph: torch.fx.Graph, fake_mode, like: Node):
        self.graph, self.fake_mode, self.like = graph, fake_mode, like

    def __call__(self, target, *args):
        node = self.graph.call_function(target, args)
        fake = torch.fx.node.map_arg(args, lambda n: n.meta["val"])
        with self.fake_mode:
            node.meta["val"] = target(*fake)
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in self.like.meta:
                node.meta[key] = self.like.meta[key]
        return node


def _translate(node: Node, pairs: dict, b: _Builder) -> Node | None:
    """The pair tensor of `node`'s result (None: the node only asserted complex metadata)."""
    t, args = node.target, node.args

    def p(x):
        return pairs[x] if isinstance(x, Node) and x in pairs else x

    if t == aten.polar.default:
        r, angle = args
        return b(aten.stack.default, [b(aten.mul.Tensor, r, b(aten.cos.default, angle)),
                                      b(aten.mul.Tensor, r, b(aten.sin.default, angle))], -1)
    if t == aten.view_as_complex.default:
        return args[0]
    if t == aten.view_as_real.default:
        return p(args[0])
    if t == aten._assert_tensor_metadata.default:
        return None
    if t == aten.mul.Tensor:
        x, y = args
        if _complex(x) and _complex(y):
            xs = [b(aten.select.int, p(x), -1, i) for i in (0, 1)]
            ys = [b(aten.select.int, p(y), -1, i) for i in (0, 1)]
            real = b(aten.sub.Tensor, b(aten.mul.Tensor, xs[0], ys[0]), b(aten.mul.Tensor, xs[1], ys[1]))
            imag = b(aten.add.Tensor, b(aten.mul.Tensor, xs[0], ys[1]), b(aten.mul.Tensor, xs[1], ys[0]))
            return b(aten.stack.default, [real, imag], -1)
        z, other = (x, y) if _complex(x) else (y, x)
        if isinstance(other, Node) and isinstance(other.meta.get("val"), torch.Tensor):
            other = b(aten.unsqueeze.default, other, -1)  # a real tensor scales both parts
        return b(aten.mul.Tensor, p(z), other)
    if t in (aten.clone.default, aten.alias.default) or (
            t in (aten.to.dtype_layout, aten._to_copy.default, aten.to.dtype) and node.meta["val"].is_complex()
            and node.meta["val"].dtype == args[0].meta["val"].dtype):
        return p(args[0])
    if t == aten.unsqueeze.default:
        return b(t, p(args[0]), _dim(args[1]))
    if t in (aten.expand.default, aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        return b(t, p(args[0]), [*args[1], 2])
    if t in (aten.select.int, aten.slice.Tensor):
        return b(t, p(args[0]), _dim(args[1]), *args[2:])
    if t == aten.gather.default and not _complex(args[2]):
        index = b(aten.unsqueeze.default, args[2], -1)
        index = b(aten.expand.default, index, [-1] * (index.meta["val"].dim() - 1) + [2])
        return b(t, p(args[0]), _dim(args[1]), index)
    if t == aten.cat.default and all(_complex(x) for x in args[0]):
        return b(t, [p(x) for x in args[0]], _dim(args[1] if len(args) > 1 else 0))
    raise ComplexOpError(f"the onnx backend cannot translate the complex-valued op {t} ({node.name}); "
                         "use backend='inductor' or 'export'")


def real_valued(program: ExportedProgram) -> ExportedProgram:
    """Rewrite `program` in place (a copy the caller owns, e.g. run_decompositions' result) so that no
    value is complex; the program's inputs and outputs are unchanged. Raises ComplexOpError for a
    complex op it cannot translate, and ValueError for a complex input or output."""
    graph = program.graph
    nodes = [n for n in graph.nodes if n.op == "call_function" and (_complex(n) or any(map(_complex, n.all_input_nodes)))]
    if not nodes:
        return program
    if any(_complex(n) for n in graph.nodes if n.op == "placeholder") or \
            any(map(_complex, graph.output_node().all_input_nodes)):
        raise UnsupportedModelError("the onnx backend cannot take or return complex tensors")
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if "val" in n.meta])
    pairs: dict[Node, Node] = {}
    for node in nodes:
        with graph.inserting_before(node):
            out = _translate(node, pairs, _Builder(graph, fake_mode, node))
        if _complex(node):
            pairs[node] = out
        elif out is not None:  # view_as_real and the like: a real result, now the pair tensor itself
            node.replace_all_uses_with(out)
    for node in reversed(nodes):  # every complex node (and the translated real ones) is now unused
        if not node.users:
            graph.erase_node(node)
    leftover = [n.name for n in graph.nodes if _complex(n)]
    if leftover:
        raise ComplexOpError(f"complex values left after the translation: {leftover[:5]}")
    graph.lint()
    program.graph_module.recompile()
    return program
