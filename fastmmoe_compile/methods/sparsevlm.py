"""The SparseVLM baseline (docs/fastmmoe.md 5.2): text raters rate the vision tokens; keep and recycle."""
from __future__ import annotations

import argparse

from ..config import SparseVLMConfig, SparseVLMStage
from ..passes import GraphPass
from ..passes.sparsevlm import SparseVLM as SparseVLMPass
from .base import Method, StageDims


class SparseVLM(Method):
    name = "sparsevlm"
    label = "SparseVLM"
    config_class = SparseVLMConfig
    help = "the SparseVLM baseline (--sparsevlm-layers, --keep-ratio)"
    flags = ("sparsevlm_layers",)
    shared_flags = ("keep_ratio",)
    flag_fields = {"sparsevlm_layers": "prune_layers"}

    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--sparsevlm-layers", type=str, default=None,
                            help="SparseVLM: the layers that prune, comma-separated (default: 2,6,15, the paper's)")

    def passes(self, config: SparseVLMConfig) -> list[GraphPass]:
        stages = self.stages(config)
        return [SparseVLMPass(stages)] if stages else []

    def bench_config(self, options, keep_ratio: float, num_layers: int) -> SparseVLMConfig:
        """The paper's layers that the model has (SparseVLMConfig.for_model)."""
        return SparseVLMConfig.for_model(num_layers, keep_ratio=keep_ratio)

    def stage_flops(self, stage: SparseVLMStage, dims: StageDims) -> int:
        """The raters' attention over every query row (2*n*n*h*d_qk: the rater rows are data-dependent),
        the recycling distances among the stage's vision tokens (2*v*v*H), and at the first stage the
        raters' choice: vision x text relevance over the full prompt (2*V*S*H, once)."""
        flops = 2 * dims.tokens * dims.tokens * dims.heads * dims.d_qk + 2 * dims.vision * dims.vision * dims.hidden
        if stage.first:
            flops += 2 * dims.prompt_vision * (dims.text + dims.prompt_vision) * dims.hidden
        return flops
