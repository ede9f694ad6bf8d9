"""The FastV baseline (docs/fastmmoe.md section 5): one stage that prunes by last-token attention."""
from __future__ import annotations

import argparse

from ..config import FastVConfig, MergeStage
from ..passes import GraphPass
from ..passes.token_reduction import TokenReduction
from .base import Method, StageDims
from .fastmmoe import merge_stage_flops


class FastV(Method):
    name = "fastv"
    label = "FastV"
    config_class = FastVConfig
    help = "the FastV baseline (--fastv-layer, --keep-ratio)"
    flags = ("fastv_layer",)
    shared_flags = ("keep_ratio",)
    flag_fields = {"fastv_layer": "prune_layer"}

    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--fastv-layer", type=int, default=None, help="FastV: the layer that prunes (default: 2)")

    def passes(self, config: FastVConfig) -> list[GraphPass]:
        stages = self.stages(config)
        return [TokenReduction(stages, name="fastv")] if stages else []

    def bench_config(self, options, keep_ratio: float, num_layers: int) -> FastVConfig:
        return FastVConfig(prune_layer=options.fastv_layer, keep_ratio=keep_ratio)

    def stage_flops(self, stage: MergeStage, dims: StageDims) -> int:
        return merge_stage_flops(stage, dims)  # use_router is off: the score row alone
