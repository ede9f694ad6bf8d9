"""Lowering with Inductor: torch.compile in process, or an AOTInductor package on disk."""
from __future__ import annotations

import torch
from torch.export import ExportedProgram

from .. import ops
from ..torch_compat import fast_cpp_stride_analysis, inductor_decompositions


def decompose(program: ExportedProgram) -> ExportedProgram:
    """Turn the routing ops into aten so Inductor can fuse them (grouped_mm stays an op).

    Re-tracing collects every shape guard the passes' fake propagation evaluated on the
    export example (batch 2), e.g. "B*S' != S'", which would reject batch 1. Those were
    layout decisions that hold for every size; the contract stays the export-time guards.
    """
    decomposed = program.run_decompositions(dict(ops.DECOMPOSITIONS))
    decomposed._guards_code = list(program._guards_code)
    return decomposed


def compile_in_process(program: ExportedProgram):
    """A callable backbone compiled by torch.compile (dynamic shapes). torch.compile compiles on the
    first call and on each recompile, so every call runs under torch_compat.fast_cpp_stride_analysis
    (microseconds; the compile itself is seconds faster)."""
    compiled = torch.compile(decompose(program).module(), dynamic=True)

    def backbone(*args, **kwargs):
        with fast_cpp_stride_analysis():
            return compiled(*args, **kwargs)

    return backbone


def package_aoti(program: ExportedProgram, path: str, constants: bool = True) -> str:
    """Compile ahead of time into a .pt2 package; returns its path. constants=False leaves the
    weights out of the package (`aot_inductor.package_constants_in_so`): the loader supplies them
    with `load_constants(...)` under the names of lower.weights.program_tensors(program)."""
    import torch._inductor

    configs = {} if constants else {"aot_inductor.package_constants_in_so": False}
    # The routing ops decompose inside AOTInductor's own trace (not decompose(): a second trace);
    # the export-time guards stay the contract, as there.
    with fast_cpp_stride_analysis(), inductor_decompositions(dict(ops.DECOMPOSITIONS)):
        return torch._inductor.aoti_compile_and_package(program, package_path=path, inductor_configs=configs)


def load_aoti(path: str):
    import torch._inductor

    return torch._inductor.aoti_load_package(path)
