"""Weights stored once per engine: the write side.

The backbone, decode and vision programs of an engine share most of their tensors (decode is the
same decoder as prefill). Their packages are written without weights (AOTInductor with
`aot_inductor.package_constants_in_so=False`; torch.export archives with stride-0 placeholders), and
every tensor they need goes once into one safetensors file, `weights.safetensors`, hashed by the
manifest like every file of the engine. The load side (runtime/backends.py) reads that file once
and hands the same tensors to every program (AOTInductor: `load_constants(user_managed=True)`, no
copy).

A tensor is stored once per storage view: two programs' entries that are the same view of the
same memory (the usual case: the decode program holds the backbone's parameters under the same
names) share one key. The manifest's programs[role]["weights"] maps a program's names to keys
where they differ ({} when every name is its own key). The token-embedding table the runtime
embeds prompts with is one of these tensors too (include(); manifest["embeddings"] names its key).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from ..runtime.backends import STRIDES_KEY  # safetensors metadata: {key: stride} of the non-contiguous tensors

WEIGHTS_FILE = "weights.safetensors"


def program_tensors(program) -> dict[str, torch.Tensor]:
    """An ExportedProgram's parameters, buffers and tensor constants by their names (the names
    AOTInductor's get_constant_fqns() asks for)."""
    tensors = dict(program.state_dict)
    tensors.update({k: v for k, v in program.constants.items() if isinstance(v, torch.Tensor)})
    return tensors


def _view(t: torch.Tensor) -> tuple:
    if t.numel() == 0:
        return ("empty", id(t))
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


class ExternalData:
    """One raw external-data file that several programs' files point into (ONNX: each initializer
    as location + offset + length), each distinct content stored once: place() appends bytes the
    file does not hold yet and returns where they are, or where the same bytes already are.

    Content-addressed, not name-addressed: the ONNX exporter folds constant expressions of the
    weights (a transposed projection, the experts' [E, I, H] -> [E, H, I]) into new initializers
    under names of its own, which differ between the prefill and decode programs while their bytes
    are equal. Offsets are aligned to ALIGNMENT bytes (a page: ONNX Runtime can map aligned
    tensors of an external file instead of reading them)."""

    ALIGNMENT = 4096

    def __init__(self, file: Path):
        self.file = Path(file)
        self._index: dict[tuple, tuple[int, int]] = {}  # (dtype, shape, length, blake2b) -> (offset, length)
        self._size = 0
        self.file.write_bytes(b"")

    def place(self, kind: tuple, data) -> tuple[int, int]:
        """(offset, length) in bytes of `data` (a contiguous buffer: bytes, a numpy array) in the file;
        kind: what the bytes are (dtype, shape), so that equal bytes of another kind stay apart."""
        import hashlib

        view = memoryview(data).cast("B")
        key = (*kind, view.nbytes, hashlib.blake2b(view, digest_size=20).hexdigest())
        if key not in self._index:
            offset = -(-self._size // self.ALIGNMENT) * self.ALIGNMENT
            with open(self.file, "r+b") as f:
                f.seek(offset)
                f.write(view)
            self._size = offset + view.nbytes
            self._index[key] = (offset, view.nbytes)
        return self._index[key]

    @property
    def stored_bytes(self) -> int:
        """The distinct contents' bytes (the file's size less the alignment padding)."""
        return sum(length for _, length in self._index.values())


class SharedWeights:
    """The tensors of an engine's programs, each view of memory once, gathered by add() and written
    by save(); and the engine's raw external-data files (external_data()), for the backends whose
    program files point into one rather than take their tensors from this one."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self._keys: dict[tuple, str] = {}
        self._external: dict[Path, ExternalData] = {}

    def external_data(self, file: Path) -> ExternalData:
        """The ExternalData at `file` (created, empty, on first use), shared by every program that asks."""
        file = Path(file)
        if file not in self._external:
            self._external[file] = ExternalData(file)
        return self._external[file]

    def add(self, role: str, program) -> dict[str, str]:
        """Gather `program`'s tensors; returns its {name: key} for the names whose key differs."""
        renames = {}
        for name, t in program_tensors(program).items():
            key = self._keys.get(_view(t))
            if key is None:
                key = name if name not in self.tensors else f"{role}/{name}"
                self.tensors[key] = t.detach()
                self._keys[_view(t)] = key
            if key != name:
                renames[name] = key
        return renames

    def include(self, name: str, tensor: torch.Tensor) -> str:
        """The key of `tensor` (a view some program already holds keeps its key; another is added
        under `name`, made unique): how the engine's token-embedding table is stored once, in this
        file, instead of in a file of its own."""
        key = self._keys.get(_view(tensor))
        if key is None:
            key = name
            while key in self.tensors:
                key = "_" + key
            self.tensors[key] = tensor.detach()
            self._keys[_view(tensor)] = key
        return key

    def save(self, file: Path) -> None:
        """One safetensors file (keys as add() named them). safetensors stores dense tensors with no
        shared memory: a strided view is stored dense with its stride in the metadata (the load side
        restores it: compiled kernels may assume it), and views into one storage each get their own copy."""
        from safetensors.torch import save_file

        dense, strides, storages = {}, {}, set()
        for key, t in self.tensors.items():
            if not t.is_contiguous():
                strides[key] = list(t.stride())
            storage = t.untyped_storage().data_ptr() if t.numel() else None
            t = t.contiguous()
            if storage is not None and storage in storages:
                t = t.clone()
            storages.add(storage)
            dense[key] = t
        save_file(dense, str(file), metadata={STRIDES_KEY: json.dumps(strides)})


@contextlib.contextmanager
def weights_detached(program):
    """`program` with every tensor of program_tensors() replaced by a stride-0 view of one element
    (same shape, dtype, device; a Parameter stays a Parameter) for the duration: torch.export.save
    then writes the graph and a few bytes per weight. Restores the tensors on exit."""
    saved_state, saved_constants = dict(program.state_dict), dict(program.constants)

    def placeholder(t):
        p = torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)
        return torch.nn.Parameter(p, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else p

    try:
        for k, v in saved_state.items():
            program.state_dict[k] = placeholder(v)
        for k, v in saved_constants.items():
            if isinstance(v, torch.Tensor):
                program.constants[k] = placeholder(v)
        yield program
    finally:
        program.state_dict.update(saved_state)
        program.constants.update(saved_constants)
