"""Lowering to ONNX, run by ONNX Runtime.

`torch.onnx.export(..., dynamo=True)` translates the rewritten program once our ops are
decomposed to aten: the routing ops as for Inductor, and merge_tokens / sparsevlm_tokens as
their loop-free kernels (ops.LOOP_FREE). Two translations are ours:
- `fastmmoe::grouped_mm` becomes a call to a model-local ONNX function of the same name:
  a Loop over the experts that have rows, which slices each one's rows out of the
  expert-sorted pair list (by the offsets) and multiplies them by that expert's matrix. It
  computes exactly the routed pairs, so Top-Kv's dropped pairs cost nothing, as in the
  exported program. Experts without rows are skipped, not multiplied by zero rows: ORT's
  Gather copies each expert's matrix it is given, and in decode (K of E experts used per
  token) those copies were most of the step (bench-qwen3-moe, 4 layers, 1 thread: 81 ms per
  step with every expert, 30 ms with the used ones; the exported program takes 35 ms).
- `aten.sort.stable` (the dispatch's sort by expert, the text/vision split, the merge's
  selection) becomes TopK over the whole axis: ONNX TopK breaks ties by the lower index,
  which is a stable sort.
Why not ORT's com.microsoft.MoE: it does its own softmax + top-k on the router input and
its CPU kernel takes only interleaved SwiGLU. Fed log-weights (and -inf for unrouted
experts) it reproduces our routing and skips zero-weight pairs, and on one bench-size layer
(1088 tokens, 64 experts, top-8, 1 thread) it was about 1.2x faster than this Loop. But using
it means pattern-matching our whole dispatch out of the graph and re-laying the weights, per
family and activation, and its CPU SwiGLU has changed meaning across ORT releases (a fixed
alpha 1.702 and clamp 7 in older ones). The Loop is exact for every family, activation and
ORT version, and keeps the graph the program we verified.
Complex values (deepseek_v2's rotary embedding; ONNX has no complex type) become real
(real, imaginary) pairs first: lower/complex_real.py.
The graph keeps the program's inputs and every one of its outputs, with their dynamic axes.
The two programs an engine holds get readable names: the prefill program (export/capture.py)
-> logits, kept_positions, key_l, value_l (batch, sequence, vision axes); the decode step
(export/decode.py) -> logits, new_key_l, new_value_l (batch and one cache_l axis per layer).
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
from torch.export import ExportedProgram

from .. import ops
from ..errors import UnsupportedModelError, UserInputError
from .complex_real import real_valued

DOMAIN = "fastmmoe"
# An engine's ONNX programs keep their initializers (of INLINE_BYTES or more) in this one file
# beside them, as ONNX external data: each distinct tensor once (lower/weights.ExternalData), so the
# prefill and decode programs, which hold the same weights, point at the same bytes.
SHARED_DATA_FILE = "weights.onnx.data"
INLINE_BYTES = 1024  # smaller initializers (scalars, shapes, norms) stay inside the .onnx file
OPSET = 20  # the ai.onnx version torch.onnx.export emits by default (2.13)
# Beyond this the model's weights go to an external data file (protobuf's 2 GiB limit).
EXTERNAL_DATA_BYTES = 1 << 30


class OnnxUnavailableError(ImportError, UserInputError):
    """The onnx extra is not installed (a UserInputError too, so the CLI reports it in one line)."""


def require_onnx():
    """onnx, onnxscript (the exporter's) and onnxruntime, or one clear error."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise OnnxUnavailableError(
            f"the onnx backend needs the onnx extra ({e.name} is missing): pip install 'fastmmoe-compile[onnx]'"
        ) from e


SUPPORTED_DTYPES = (torch.float32,)


def export_onnx(program: ExportedProgram, path: str | os.PathLike, data=None) -> Path:
    """Write the program as an ONNX model at `path`. Its weights: with `data` (a
    lower.weights.ExternalData, the engine's SHARED_DATA_FILE), every initializer of INLINE_BYTES
    or more goes there as external data (location relative to `path`'s directory, which must be the
    data file's), stored once across the programs that share it; without, inline in the file, or
    beside it in `<name>.data` when over EXTERNAL_DATA_BYTES (protobuf's 2 GiB limit).

    Every input and output of the program is kept, in order, with its dynamic axes.
    UnsupportedModelError for weights of a dtype the backend does not support (SUPPORTED_DTYPES);
    OnnxUnavailableError without the onnx extra."""
    require_onnx()
    import onnx_ir as ir
    from onnx import helper

    dtype = _float_dtype(program)
    if dtype not in SUPPORTED_DTYPES:
        raise UnsupportedModelError(
            f"the onnx backend supports {[str(d).removeprefix('torch.') for d in SUPPORTED_DTYPES]} "
            f"weights, got {str(dtype).removeprefix('torch.')}")
    output_names, axes = _names(program)
    # Complex values (deepseek_v2's rotary embedding) become real pairs: lower/complex_real.py.
    decomposed = real_valued(_decompose(program))
    with _quiet_loggers("torch.onnx", "onnx_ir", "onnxscript"):  # "torchvision is not installed" and the like
        onnx_program = torch.onnx.export(decomposed, dynamo=True, custom_translation_table=_translations(),
                                         output_names=output_names, verbose=False)
    model = onnx_program.model
    onnx_program.rename_axes(_axis_names(model, axes))  # s59 -> batch, also inside the expressions of later sizes
    if DOMAIN in model.opset_imports or any(n.domain == DOMAIN for n in model.graph):
        opset = model.opset_imports[""]
        elem = helper.np_dtype_to_tensor_dtype(torch.empty(0, dtype=dtype).numpy().dtype)
        function = ir.serde.deserialize_function(grouped_mm_function(elem, opset))
        model.functions[function.identifier()] = function
        model.opset_imports[DOMAIN] = 1
    path = Path(path)
    if data is not None:
        _externalize(model, path, data)
        ir.save(model, str(path))  # the graph; the external tensors stay references into `data`
        return path
    external = sum(t.nbytes for t in program.state_dict.values()) > EXTERNAL_DATA_BYTES
    onnx_program.save(str(path), external_data=external)
    return path


def _externalize(model, path: Path, data) -> None:
    """Every initializer of `model` of INLINE_BYTES or more becomes an external tensor in `data`
    (its bytes placed there once: equal bytes of another program reuse the same offset)."""
    import numpy as np
    import onnx_ir as ir

    if data.file.parent.resolve() != path.parent.resolve():
        raise ValueError(f"the ONNX data file {data.file} must be beside {path} (external data is found by a "
                         "location relative to the model)")
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or tensor.nbytes < INLINE_BYTES:
            continue
        array = np.ascontiguousarray(tensor.numpy())  # a view of the exported tensor's memory where it can be
        offset, length = data.place((tensor.dtype, tuple(tensor.shape.numpy())), array)
        value.const_value = ir.ExternalTensor(data.file.name, offset, length, tensor.dtype, shape=tensor.shape,
                                              name=name, base_dir=str(path.parent))


def _names(program: ExportedProgram) -> tuple[list[str] | None, dict[str, dict[int, str]]]:
    """Output names and input axis names for the engine's two programs (by their input names);
    other programs keep the exporter's names."""
    inputs = list(program.graph_signature.user_inputs)
    outputs = len(program.graph_signature.user_outputs)
    caches = [f"{kind}_{i}" for i in range((outputs - 2) // 2) for kind in ("key", "value")]
    if inputs[:2] == ["inputs_embeds", "vision_positions"] and outputs % 2 == 0:  # export/capture.py's Backbone
        # The family's extra inputs (runtime/specs.py) after these two: each axis that is the batch or
        # the sequence of inputs_embeds (the same symbol) is named so.
        shapes = {n.name: n.meta["val"].shape for n in program.graph.nodes
                  if n.op == "placeholder" and n.name in inputs}
        named = {str(shapes["inputs_embeds"][0]): "batch", str(shapes["inputs_embeds"][1]): "sequence"}
        axes = {"inputs_embeds": {0: "batch", 1: "sequence"}, "vision_positions": {0: "batch", 1: "vision"},
                **{name: {i: named[str(d)] for i, d in enumerate(shapes[name]) if str(d) in named}
                   for name in inputs[2:]}}
        return ["logits", "kept_positions", *caches], axes
    if inputs[:2] == ["inputs_embeds", "position_ids"] and outputs % 2 == 1:  # export/decode.py's DecodeStep
        layers = (outputs - 1) // 2
        axes = {"inputs_embeds": {0: "batch"}, **{f"keys_{i}": {0: f"cache_{i}"} for i in range(layers)}}
        return ["logits", *(f"new_key_{i}" for i in range(layers)), *(f"new_value_{i}" for i in range(layers))], axes
    return None, {}


def _axis_names(model, axes: dict[str, dict[int, str]]) -> dict[str, str]:
    """{exporter's symbol: our name} for the named axes of the model's inputs."""
    import onnx_ir as ir

    mapping = {}
    for value in model.graph.inputs:
        for axis, name in axes.get(value.name, {}).items():
            dim = value.shape[axis] if value.shape is not None else None
            if isinstance(dim, ir.SymbolicDim) and isinstance(dim.value, str):
                mapping.setdefault(dim.value, name)
    return mapping


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _decompose(program: ExportedProgram) -> ExportedProgram:
    """Inductor's decompositions, plus merge_tokens as its loop-free form (ONNX cannot call back into
    Python). The export-time guards stay the contract, as in lower.inductor.decompose."""
    table = {**ops.DECOMPOSITIONS, **ops.LOOP_FREE}
    decomposed = program.run_decompositions(table)
    decomposed._guards_code = list(program._guards_code)
    return decomposed


def _float_dtype(program: ExportedProgram) -> torch.dtype:
    for t in program.state_dict.values():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _translations():
    import onnxscript
    from onnxscript import opset18 as op

    gmm = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, 1), "grouped_mm", _grouped_mm_schema())

    def grouped_mm(x, w, offs):
        return gmm(x, w, offs)

    def sort_stable(self, stable=None, dim: int = -1, descending: bool = False):
        size = op.Reshape(op.Gather(op.Shape(self), dim, axis=0), op.Constant(value_ints=[1]))
        small_int = not self.dtype.is_floating_point() and self.dtype.bitwidth < 32  # TopK takes no int8/bool
        x = op.Cast(self, to=onnxscript.INT32.dtype) if small_int else self
        values, indices = op.TopK(x, size, axis=dim, largest=descending, sorted=True)
        return (op.Cast(values, to=self.dtype) if small_int else values), indices

    return {ops.EXPERT_GEMM: grouped_mm, torch.ops.aten.sort.stable: sort_stable}


def _grouped_mm_schema():
    from onnx.defs import OpSchema

    param = OpSchema.FormalParameter
    return OpSchema(
        "grouped_mm", DOMAIN, 1,
        inputs=[param("x", "T"), param("w", "T"), param("offs", "tensor(int32)")],
        outputs=[param("out", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
    )


def grouped_mm_function(elem_type: int, opset: int = OPSET):
    """fastmmoe.grouped_mm(x [P, in], w [G, in, out], offs [G] int32) -> [P, out]: a Loop over the groups
    that have rows (P > 0: every token routes somewhere).

    elem_type (the model's float type) is spelled out: ORT needs the Loop's sequence element type."""
    from onnx import TensorProto, helper

    h = helper
    body = h.make_graph(
        [
            h.make_node("Gather", ["used", "i"], ["g"], axis=0),
            h.make_node("Gather", ["starts", "g"], ["s"], axis=0),
            h.make_node("Add", ["g", "one"], ["g1"]),
            h.make_node("Gather", ["starts", "g1"], ["e"], axis=0),
            h.make_node("Unsqueeze", ["s", "zero_1d"], ["s1"]),
            h.make_node("Unsqueeze", ["e", "zero_1d"], ["e1"]),
            h.make_node("Slice", ["x", "s1", "e1", "zero_1d"], ["rows"]),
            h.make_node("Gather", ["w", "g"], ["wg"], axis=0),
            h.make_node("MatMul", ["rows", "wg"], ["y"]),
            h.make_node("SequenceInsert", ["acc_in", "y"], ["acc_out"]),
            h.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "grouped_mm_body",
        [h.make_tensor_value_info("i", TensorProto.INT64, []),
         h.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         h.make_tensor_sequence_value_info("acc_in", elem_type, None)],
        [h.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         h.make_tensor_sequence_value_info("acc_out", elem_type, None)],
    )
    nodes = [
        h.make_node("Constant", [], ["zero_1d"], value_ints=[0]),
        h.make_node("Constant", [], ["one"], value_int=1),
        h.make_node("Constant", [], ["zero"], value_int=0),
        h.make_node("Constant", [], ["minus_one_1d"], value_ints=[-1]),
        h.make_node("Constant", [], ["true"], value=h.make_tensor("t", TensorProto.BOOL, [], [True])),
        h.make_node("Cast", ["offs"], ["offs64"], to=TensorProto.INT64),
        h.make_node("Concat", ["zero_1d", "offs64"], ["starts"], axis=0),
        # Only the groups with rows: an empty group would still cost a copy of its weight (Gather).
        h.make_node("Slice", ["starts", "zero_1d", "minus_one_1d"], ["starts_head"]),
        h.make_node("Sub", ["offs64", "starts_head"], ["counts"]),
        h.make_node("Greater", ["counts", "zero"], ["nonempty"]),
        h.make_node("NonZero", ["nonempty"], ["used_2d"]),
        h.make_node("Squeeze", ["used_2d", "zero_1d"], ["used"]),
        h.make_node("Shape", ["used"], ["groups_1d"]),
        h.make_node("Squeeze", ["groups_1d", "zero_1d"], ["groups"]),
        h.make_node("SequenceEmpty", [], ["acc0"], dtype=elem_type),
        h.make_node("Loop", ["groups", "true", "acc0"], ["acc"], body=body),
        h.make_node("ConcatFromSequence", ["acc"], ["out"], axis=0),
    ]
    return h.make_function(DOMAIN, "grouped_mm", ["x", "w", "offs"], ["out"], nodes,
                           [h.make_opsetid("", opset)])
