"""Lowering with Inductor: torch.compile in process, or an AOTInductor package on disk."""
from __future__ import annotations

import torch
from torch.export import ExportedProgram

from .. import ops


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
    """A callable backbone compiled by torch.compile (dynamic shapes)."""
    return torch.compile(decompose(program).module(), dynamic=True)


def package_aoti(program: ExportedProgram, path: str, constants: bool = True) -> str:
    """Compile ahead of time into a .pt2 package; returns its path. constants=False leaves the
    weights out of the package (`aot_inductor.package_constants_in_so`): the loader supplies them
    with `load_constants(...)` under the names of lower.weights.program_tensors(program)."""
    import torch._inductor

    configs = {} if constants else {"aot_inductor.package_constants_in_so": False}
    return torch._inductor.aoti_compile_and_package(decompose(program), package_path=path,
                                                    inductor_configs=configs)


def load_aoti(path: str):
    import torch._inductor

    return torch._inductor.aoti_load_package(path)
