"""Lower: the rewritten program to a backend (Inductor / AOTInductor; ONNX and TensorRT to come)."""
from .inductor import compile_in_process, decompose, load_aoti, package_aoti

BACKENDS = ("inductor", "export")

__all__ = ["BACKENDS", "compile_in_process", "decompose", "load_aoti", "package_aoti"]
