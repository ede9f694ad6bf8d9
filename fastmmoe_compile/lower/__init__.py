"""Lower: the rewritten program to a backend (Inductor / AOTInductor, ONNX Runtime; TensorRT to come)."""
from .inductor import compile_in_process, decompose, load_aoti, package_aoti

BACKENDS = ("inductor", "export", "onnx")

__all__ = ["BACKENDS", "compile_in_process", "decompose", "load_aoti", "package_aoti"]
