"""Lower: the rewritten program to a backend (Inductor / AOTInductor, ONNX Runtime; TensorRT to come).
The backends and their names: lower/backends.py."""
from .backends import BACKENDS, Backend, backend_names, get_backend, register
from .inductor import compile_in_process, decompose, load_aoti, package_aoti

__all__ = ["BACKENDS", "Backend", "backend_names", "compile_in_process", "decompose", "get_backend", "load_aoti",
           "package_aoti", "register"]
