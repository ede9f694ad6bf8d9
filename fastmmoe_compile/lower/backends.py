"""The backend table, write side: how each backend turns an ExportedProgram into a file of the
engine dir, or into a callable in this process. The load side is runtime/backends.py, keyed by
the same name (the manifest's "backend"). A new backend is one register() here and one
runtime.backends.register_loader() there; nothing else branches on the name.

Roles: "backbone" (prefill), "decode" (the one-token step, export/decode.py), "vision" (a VLM's
vision encoder). A program's file is `<role><suffix>`, e.g. backbone.pt2, decode.onnx.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import UserInputError

if TYPE_CHECKING:
    from torch.export import ExportedProgram

# torch only inside the functions: backend_names() stays a cheap import for the CLI.


def _nothing_needed() -> None:
    pass


@dataclass(frozen=True)
class Backend:
    name: str
    suffix: str  # the program files' extension, with its dot
    # (program, file, role): one program on disk. With external_data: (program, file, role, weights)
    # -> the extra fields of the program's manifest entry (or None), weights being the engine's
    # SharedWeights (lower/weights.py), whose external_data() files its programs point into.
    write: Callable[..., dict | None]
    in_process: Callable[[ExportedProgram, str], Callable]  # (program, role) -> what the engine calls
    lowering: str = "torch.export.save"  # progress label of write
    in_process_label: str = "eager"  # progress label of in_process
    require: Callable[[], None] = _nothing_needed  # raises before any work if the backend cannot run here
    vision: str | None = None  # another backend's name for the vision role, where this one has none
    # write() leaves the weights out of the file: they go once into the engine's shared weights
    # file (lower/weights.py), and the loader takes them from there.
    shared_weights: bool = False
    # write() stores the weights in an external-data file shared by the engine's programs (ONNX),
    # and takes the SharedWeights that holds it as a fourth argument.
    external_data: bool = False
    # The devices it compiles for: {device: None where it can, else why not (one clause after
    # "--backend NAME", e.g. "runs on the CPU ...")}.
    devices: dict = dataclasses.field(default_factory=lambda: {"cpu": None, "cuda": None})

    def file(self, role: str) -> str:
        return role + self.suffix


BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add (or replace) a backend by its name; returns it."""
    BACKENDS[backend.name] = backend
    return backend


def backend_names() -> tuple[str, ...]:
    """The legal backend names, in registration order (the CLI's --backend choices)."""
    return tuple(BACKENDS)


class BackendError(UserInputError):
    """A backend name that is not registered, or one that cannot be used here (bad input)."""


class BackendUnavailableError(BackendError, NotImplementedError):
    """A registered backend that is not built yet (tensorrt)."""


def get_backend(name) -> Backend:
    """The registered backend `name`. Raises BackendError naming the legal ones otherwise, and
    BackendUnavailableError for a backend that is not built yet."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise BackendError(f"backend must be one of {backend_names()}, got {name!r}")
    BACKENDS[name].require()
    return BACKENDS[name]


def vision_backend(backend: Backend) -> Backend:
    """The backend that writes/builds the vision encoder of an engine of `backend`."""
    return BACKENDS[backend.vision] if backend.vision else backend


# --- the built-in backends ---

def _aoti_write(program, file, role):
    from .inductor import package_aoti

    package_aoti(program, str(file), constants=False)


def _compiled(program, role):
    from .inductor import compile_in_process

    return compile_in_process(program)


def _export_write(program, file, role):
    import torch

    from .weights import weights_detached

    with weights_detached(program), warnings.catch_warnings():
        # The stride-0 placeholders cover more than their one-element storage, which the archive writer notes.
        warnings.filterwarnings("ignore", message="No complete tensor found")
        torch.export.save(program, str(file))


def _eager(program, role):
    return program.module()


def _onnx_write(program, file, role, weights):
    """The .onnx file holds the graph; every initializer of 1 KiB or more is external data in the
    engine's one ONNX data file, shared by the prefill and decode programs (lower/onnx.py)."""
    from .onnx import SHARED_DATA_FILE, export_onnx

    export_onnx(program, file, data=weights.external_data(Path(file).parent / SHARED_DATA_FILE))
    return {"data": SHARED_DATA_FILE}


def _onnx_in_process(program, role):
    """An ONNX Runtime session on the exported model (the files are only needed while it loads)."""
    import tempfile

    from ..runtime.backends import load_program
    from .onnx import export_onnx

    with tempfile.TemporaryDirectory(prefix="fastmmoe-onnx-") as d:
        return load_program(export_onnx(program, Path(d) / f"{role}.onnx"), "onnx", role)


def _onnx_required():
    from .onnx import require_onnx

    require_onnx()


def _tensorrt_required():
    raise BackendUnavailableError("backend 'tensorrt' is not built yet: it needs TensorRT (a tensorrt extra) and a "
                              "CUDA GPU; use 'inductor', 'onnx' or 'export'")


register(Backend("inductor", ".pt2", _aoti_write, _compiled, lowering="AOTInductor",
                 in_process_label="torch.compile", shared_weights=True))
register(Backend("export", ".pt2", _export_write, _eager, shared_weights=True))
register(Backend("onnx", ".onnx", _onnx_write, _onnx_in_process, lowering="torch.onnx.export",
                 in_process_label="ONNX Runtime", require=_onnx_required, vision="export", external_data=True,
                 devices={"cpu": None, "cuda": "runs on the CPU (onnxruntime; onnxruntime-gpu is not supported): "
                                               "use --backend inductor or export for --device cuda"}))  # no ONNX vision encoder yet
register(Backend("tensorrt", ".plan", _export_write, _eager, require=_tensorrt_required))  # a name, refused
