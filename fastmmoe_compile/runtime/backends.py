"""The backend table, load side: how each backend's program file becomes a callable. Keyed by
the manifest's "backend" (the write side is lower/backends.py). A new backend is one
register_loader() call; load_role() reads the file name from the manifest's "programs".

manifest["programs"][role] = {"file": <name in the engine dir>, optionally "backend": <name>
when that role is stored in another backend's format (an ONNX engine's vision encoder is a
torch.export archive), and "weights": {name: key} where the program's file holds no weights}.
Roles: "backbone", "decode", "vision".

Weights stored once (lower/weights.py writes them): manifest["weights"] = {"file": <a safetensors
file>} holds the tensors of every program whose entry has "weights"; load_weights() reads it once
and load_role() hands each program the same tensors (a program's name maps to itself unless its
"weights" renames it). Engines without manifest["weights"] (written before) carry the weights in
each program file and load as before.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping

import torch

from .. import torch_compat
from .manifest import EngineFormatError

Weights = Mapping[str, torch.Tensor]
# name -> load(file: Path, role: str, weights: Weights | None) -> callable program; weights: the
# program's tensors by name where its file holds none (None: the file has them)
LOADERS: dict[str, Callable[[Path, str, Weights | None], Callable]] = {}
STRIDES_KEY = "fastmmoe.strides"  # lower/weights.py: {key: stride} of tensors stored dense


def register_loader(name: str, load: Callable[[Path, str, Weights | None], Callable]) -> None:
    """Add (or replace) how engines of backend `name` load their program files."""
    LOADERS[name] = load


def loader_names() -> tuple[str, ...]:
    return tuple(LOADERS)


def load_program(file: Path, backend: str, role: str = "backbone", weights: Weights | None = None) -> Callable:
    """One program file as a callable, loaded as `backend` says (weights: see LOADERS)."""
    return LOADERS[backend](Path(file), role, weights)


def load_weights(path: Path, manifest: dict, device: str = "cpu") -> dict[str, torch.Tensor] | None:
    """The shared weights file of the engine dir `path` (manifest["weights"]["file"]) on `device`,
    each tensor with the stride it was compiled with; None for an engine without one. A file that
    is not a safetensors file of weights is an EngineFormatError."""
    entry = manifest.get("weights")
    if entry is None:
        return None
    from safetensors import safe_open

    file = path / entry["file"]
    try:
        with safe_open(str(file), framework="pt", device=device) as f:
            strides = json.loads((f.metadata() or {}).get(STRIDES_KEY, "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise EngineFormatError(f"{path}: {entry['file']} does not hold the engine's weights ({type(e).__name__}: "
                                f"{str(e).strip()[:200]}): recompile the model") from e
    for k, stride in strides.items():  # restored once here, not per call: compiled kernels may assume it
        dense = tensors[k]
        tensors[k] = torch.empty_strided(dense.shape, stride, dtype=dense.dtype, device=dense.device).copy_(dense)
    return tensors


def _program_weights(path: Path, manifest: dict, role: str, weights: dict | None) -> Weights | None:
    renames = manifest["programs"][role].get("weights")
    if renames is None:
        return None
    if weights is None:
        raise EngineFormatError(f"{path}: programs.{role} takes its weights from the shared weights file, but "
                                "the manifest names none (a corrupt or hand-edited manifest: recompile the model)")
    view = dict(weights)
    view.update({name: weights[key] for name, key in renames.items() if key in weights})
    return view


def role_backend(manifest: dict, role: str) -> str:
    return manifest["programs"][role].get("backend", manifest["backend"])


def load_role(path: Path, manifest: dict, role: str, weights: dict | None = None) -> Callable:
    """The program of `role` in the engine dir `path` (check_manifest has vetted its entry); weights:
    load_weights()'s, shared by every role. A file that does not load as its backend says, or asks
    for a weight the shared file lacks, is an EngineFormatError (a missing runtime package stays an
    ImportError)."""
    file, backend = manifest["programs"][role]["file"], role_backend(manifest, role)
    program_weights = _program_weights(path, manifest, role, weights)
    try:
        return load_program(path / file, backend, role, program_weights)
    except ImportError:
        raise
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise EngineFormatError(f"{path}: {file} does not load as an {backend} program ({type(e).__name__}: "
                                f"{reason}); the manifest's backend may be wrong, or the engine was built by "
                                "an incompatible torch: recompile the model") from e


# --- the built-in backends ---

def _needed(file: Path, names, weights: Weights) -> dict[str, torch.Tensor]:
    missing = [n for n in names if n not in weights]
    if missing:
        raise KeyError(f"{file.name} needs weights the shared weights file lacks: {', '.join(missing[:3])}")
    return {n: weights[n] for n in names}


def _aoti(file: Path, role: str, weights: Weights | None):
    from torch._inductor import aoti_load_package

    program = aoti_load_package(str(file))
    if weights is not None:  # the same tensors for every program, not copied (the engine keeps them alive)
        program.load_constants(_needed(file, program.get_constant_fqns(), weights), check_full_update=True,
                               user_managed=True)
        program.weights = weights  # user_managed: the program holds raw pointers
    return program


def _exported(file: Path, role: str, weights: Weights | None):
    with torch_compat.fast_export_load():
        program = torch.export.load(str(file))
    if weights is not None:  # the archive holds stride-0 placeholders (lower/weights.py)
        params = set(program.graph_signature.parameters)
        for name, t in _needed(file, program.state_dict, weights).items():
            program.state_dict[name] = torch.nn.Parameter(t, requires_grad=False) if name in params else t
        tensors = [n for n, v in program.constants.items() if isinstance(v, torch.Tensor)]
        program.constants.update(_needed(file, tensors, weights))
    return program.module()


def _ort(file: Path, role: str, weights: Weights | None):
    from .onnx_runtime import OrtBackbone, OrtDecodeStep

    return OrtDecodeStep(file) if role == "decode" else OrtBackbone(file)


register_loader("inductor", _aoti)
register_loader("export", _exported)
register_loader("onnx", _ort)
