"""Lower: the rewritten program to a backend (Inductor / AOTInductor, ONNX Runtime; TensorRT to come).
The backends and their names: lower/backends.py (importable without torch, for the CLI)."""
from .backends import BACKENDS, Backend, backend_names, get_backend, register

_INDUCTOR = ("compile_in_process", "decompose", "load_aoti", "package_aoti")


def __getattr__(name):  # the Inductor helpers load torch: only when asked for
    if name in _INDUCTOR:
        from . import inductor

        return getattr(inductor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BACKENDS", "Backend", "backend_names", "get_backend", "register", *_INDUCTOR]
