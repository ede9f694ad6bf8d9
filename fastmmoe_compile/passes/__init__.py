"""Passes over the exported backbone: find the routers, rewrite them, report the diff. The passes a
configuration asks for are its method's (fastmmoe_compile.methods: apply_passes)."""
from .base import GraphPass, PassResult
from .diff import diff, summarize
from .modality_topk import ModalityTopK
from .pipeline import PassRecord, run_passes
from .routers import RouterSite, find_routers

__all__ = [
    "GraphPass", "ModalityTopK", "PassRecord", "PassResult", "RouterSite",
    "diff", "find_routers", "run_passes", "summarize",
]
