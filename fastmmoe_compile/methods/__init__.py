"""The methods a configuration can be of, by name (METHODS): FastMMoE and the FastV and SparseVLM
baselines built in; register(Method()) adds another (tests/test_methods.py adds one)."""
from .base import METHODS, Config, Method, StageDims, apply_passes, flag, method_of, register
from .fastmmoe import FastMMoE
from .fastv import FastV
from .sparsevlm import SparseVLM

for _method in (FastMMoE(), FastV(), SparseVLM()):
    register(_method)

__all__ = ["METHODS", "Config", "FastMMoE", "FastV", "Method", "SparseVLM", "StageDims", "apply_passes",
           "flag", "method_of", "register"]
