"""Passes over the exported backbone: find the routers, rewrite them, report the diff."""
from .base import GraphPass, PassResult
from .diff import diff, summarize
from .modality_topk import ModalityTopK
from .pipeline import PassRecord, apply_passes, build_passes
from .routers import RouterSite, find_routers

__all__ = [
    "GraphPass", "ModalityTopK", "PassRecord", "PassResult", "RouterSite",
    "apply_passes", "build_passes", "diff", "find_routers", "summarize",
]
