"""The backend table, load side: how each backend's program file becomes a callable. Keyed by
the manifest's "backend" (the write side is lower/backends.py). A new backend is one
register_loader() call; load_role() reads the file name from the manifest's "programs".

manifest["programs"][role] = {"file": <name in the engine dir>, optionally "backend": <name>
when that role is stored in another backend's format (an ONNX engine's vision encoder is a
torch.export archive)}. Roles: "backbone", "decode", "vision".
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .manifest import EngineFormatError

# name -> load(file: Path, role: str) -> callable program
LOADERS: dict[str, Callable[[Path, str], Callable]] = {}


def register_loader(name: str, load: Callable[[Path, str], Callable]) -> None:
    """Add (or replace) how engines of backend `name` load their program files."""
    LOADERS[name] = load


def loader_names() -> tuple[str, ...]:
    return tuple(LOADERS)


def load_program(file: Path, backend: str, role: str = "backbone") -> Callable:
    """One program file as a callable, loaded as `backend` says."""
    return LOADERS[backend](Path(file), role)


def role_backend(manifest: dict, role: str) -> str:
    return manifest["programs"][role].get("backend", manifest["backend"])


def load_role(path: Path, manifest: dict, role: str) -> Callable:
    """The program of `role` in the engine dir `path` (check_manifest has vetted its entry); a file
    that does not load as its backend says is an EngineFormatError (a missing runtime package
    stays an ImportError)."""
    file, backend = manifest["programs"][role]["file"], role_backend(manifest, role)
    try:
        return load_program(path / file, backend, role)
    except ImportError:
        raise
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise EngineFormatError(f"{path}: {file} does not load as an {backend} program ({type(e).__name__}: "
                                f"{reason}); the manifest's backend may be wrong, or the engine was built by "
                                "an incompatible torch: recompile the model") from e


# --- the built-in backends ---

def _aoti(file: Path, role: str):
    from torch._inductor import aoti_load_package

    return aoti_load_package(str(file))


def _exported(file: Path, role: str):
    return torch.export.load(str(file)).module()


def _ort(file: Path, role: str):
    from .onnx_runtime import OrtBackbone, OrtDecodeStep

    return OrtDecodeStep(file) if role == "decode" else OrtBackbone(file)


register_loader("inductor", _aoti)
register_loader("export", _exported)
register_loader("onnx", _ort)
