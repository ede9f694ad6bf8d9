"""FastMMoE (docs/fastmmoe.md sections 1 and 2): Top-Kv for vision tokens, then routing-aware merging."""
from __future__ import annotations

import argparse

from ..algorithm import stage_ratios
from ..config import CONFIG_PRESETS, MERGE_METHODS, STRATEGIES, ConfigError, FastMMoEConfig, MergeStage, \
    config_fields, config_preset
from ..lower.backends import BackendError
from ..passes import GraphPass, ModalityTopK
from ..passes.token_reduction import TokenReduction
from .base import Method, StageDims, flag

_LIST_HELP = {"merge_layers": "decoder layers that merge vision tokens, comma-separated, e.g. 5,8,12",
              "stage_ratios": "vision tokens each merge stage keeps, comma-separated, e.g. 0.91,0.91,0.91 "
                              "(instead of --keep-ratio)"}
# Flags of token merging: they act only where merge layers are set (--merge-layers or --preset).
_MERGE_ONLY = ("keep_ratio", "stage_ratios", "merge_ratio", "window", "alpha", "strategy", "merge_method",
               "authors_compat")


def merge_stage_flops(stage: MergeStage, dims: StageDims) -> int:
    """A merge / prune stage's own work: the last query's score row (2*n*h*d_qk) and, where it scores
    by routing too, the router it clones onto the pre-stage tokens (2*n*H*E)."""
    router = 2 * dims.tokens * dims.router_weights if stage.use_router else 0
    return 2 * dims.tokens * dims.heads * dims.d_qk + router


class FastMMoE(Method):
    name = "fastmmoe"
    label = "FastMMoE"
    config_class = FastMMoEConfig
    help = "fastmmoe (default)"
    flags = (*(f.name for f in config_fields()), "preset")

    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--preset", choices=sorted(CONFIG_PRESETS), default=None,
                            help="the authors' settings for a model (docs/fastmmoe.md section 3); explicit flags "
                                 "override")

    def add_flag_group(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("FastMMoE configuration (defaults: docs/fastmmoe.md section 3)")
        for f in config_fields():
            option = flag(f.name)
            if f.name in _LIST_HELP:
                group.add_argument(option, type=str, default=None, help=f"{_LIST_HELP[f.name]} (default: {f.default})")
            elif f.name == "vision_topk":
                group.add_argument(option, type=int, default=None, help="explicit Kv (overrides --vision-expert-ratio)")
            elif f.name == "authors_compat":
                group.add_argument(option, action="store_const", const=True, default=None,
                                   help="the authors' released code's stage counts and window padding "
                                        "(docs/fastmmoe.md 2.11; default: off, our semantics)")
            elif f.name in ("strategy", "merge_method"):
                choices = STRATEGIES if f.name == "strategy" else MERGE_METHODS
                group.add_argument(option, choices=choices, default=None, help=f"(default: {f.default})")
            else:
                group.add_argument(option, type=type(f.default), default=None, help=f"(default: {f.default})")

    def from_flags(self, typed: dict) -> FastMMoEConfig:
        """The configuration of the typed flags (over the preset's). No flag is silently ignored: one
        this configuration would not use is a ConfigError that says why."""
        typed = dict(typed)
        preset = typed.pop("preset", None)

        def refuse(fields, why):
            for name in fields:
                if name in typed:
                    raise ConfigError(f"{flag(name)} {why}")

        layers = typed.get("merge_layers", CONFIG_PRESETS[preset]["merge_layers"] if preset else ())
        if not FastMMoEConfig(merge_layers=layers).merge_layers:
            refuse(_MERGE_ONLY, "needs --merge-layers or --preset: token merging runs only at merge layers")
        if "stage_ratios" in typed:
            refuse(["keep_ratio"], "and --stage-ratios both set the stages' ratios: pass one of them")
        if "vision_topk" in typed:
            refuse(["vision_expert_ratio"], "and --vision-topk both set Kv: pass one of them")
        c = config_preset(preset, **typed) if preset else FastMMoEConfig(**typed)  # its own range checks first
        if c.merge_layers and all(r >= 1 for r in stage_ratios(c.keep_ratio, len(c.merge_layers), c.stage_ratios)):
            refuse(("merge_layers", "merge_ratio", "window", "alpha", "strategy", "merge_method"),
                   "has no effect while every stage keeps all vision tokens (--keep-ratio 1, the default without "
                   "--preset): pass --keep-ratio below 1 or --stage-ratios")
        if c.vision_topk is None and c.vision_expert_ratio >= 1:
            refuse(["reduce_from_layer"], "has no effect with --vision-expert-ratio 1: vision tokens keep every expert")
        if c.strategy != "hybrid":
            refuse(["alpha"], f"weighs the scores of --strategy hybrid only, not of --strategy {c.strategy}")
        if c.merge_ratio == 0:
            refuse(["window", "merge_method", "alpha"], "has no effect with --merge-ratio 0: no windows are merged")
        return c

    def passes(self, config: FastMMoEConfig) -> list[GraphPass]:
        stages = self.stages(config)
        passes: list[GraphPass] = [ModalityTopK(config.vision_experts,
                                                fresh_until_layer=stages[0].layer if stages else None)]
        if stages:
            passes.append(TokenReduction(stages, name="routing_merge"))
        return passes

    def vision_experts(self, config: FastMMoEConfig, layer: int, top_k: int) -> int:
        return config.vision_experts(layer, top_k)

    def stage_flops(self, stage: MergeStage, dims: StageDims) -> int:
        return merge_stage_flops(stage, dims)

    def bench_config(self, options, keep_ratio: float, num_layers: int) -> FastMMoEConfig | None:
        """The authors' settings (--config-preset) at this retention, where the model has their merge layers."""
        config = config_preset(options.config_preset, keep_ratio=keep_ratio)
        return config if max(config.merge_layers) < num_layers else None

    def check_backend(self, config: FastMMoEConfig, backend: str) -> None:
        if backend == "onnx" and config.authors_compat:
            # Its token counts are unbacked sizes in the graph (ops.merge_tokens); the ONNX export of that
            # graph did not finish in 15 minutes on a tiny model, so it is refused rather than left to hang.
            raise BackendError("--authors-compat is not supported by --backend onnx; use --backend inductor or "
                               "export")
