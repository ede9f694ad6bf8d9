"""What a method is, and the registry of them: the one place a configuration's type is looked at.

A method (FastMMoE, the FastV and SparseVLM baselines, or one a user registers) is a configuration
class and everything the compiler asks about a configuration of it: its graph passes, its experts per
vision token and its stages' extra FLOPs (flops.py), its command-line flags (cli.py), and the backends
it cannot be lowered by. The pipeline, flops, cli and api ask `method_of(config)` and name no method.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from torch.export import ExportedProgram

from ..passes import GraphPass, PassRecord, run_passes
from ..passes.token_reduction import locate_anchors

Config = Any  # a configuration of a registered method (its Method.config_class)


@dataclass(frozen=True)
class StageDims:
    """What a token-reduction stage's own FLOPs depend on, at its layer (flops.analytic_flops)."""

    tokens: int  # sequence length the layer's attention runs on (before the stage)
    vision: int  # vision tokens among them
    heads: int  # query heads
    d_qk: int  # query / key head dim
    hidden: int  # the residual stream's width
    router_weights: int  # hidden * experts of the layer's router (0 in a dense layer)
    text: int  # text tokens of the prompt
    prompt_vision: int  # vision tokens of the prompt (before any stage)


class Method:
    """One method. Subclasses set the class attributes and override what differs from the defaults
    (no passes, every expert for vision tokens, stages of no extra FLOPs, no flags of its own).

    config_class is a dataclass with check_model(num_layers, top_k) (ConfigError before any export),
    stages() (each with .layer and .vision_after(num_vision), the graph's own count: flops reads it)
    and to_dict() (the engine manifest's "config")."""

    name: str  # --method NAME
    label: str  # its name in reports ("FastV")
    config_class: type
    help: str = ""  # its clause of --method's help
    flags: tuple[str, ...] = ()  # argparse dests of the flags add_flags adds (their flag: --dashed-dest)
    shared_flags: tuple[str, ...] = ()  # other methods' flags it reads too (--keep-ratio of the baselines)
    flag_fields: dict[str, str] = {}  # {dest: config field} where a flag sets a field of another name

    def field_of(self, dest: str) -> str | None:
        """The config field that flag `dest` sets (None: no field, e.g. --preset)."""
        name = self.flag_fields.get(dest, dest)
        return name if name in {f.name for f in dataclasses.fields(self.config_class)} else None

    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        """Add its flags (`flags`) to a command's parser, each with default None (not typed). The
        parser lists every method's add_flags, then every method's add_flag_group."""

    def add_flag_group(self, parser: argparse.ArgumentParser) -> None:
        """Add the rest of its flags as an argument group of their own (listed after the others)."""

    def from_flags(self, typed: dict) -> Config:
        """Its configuration from the typed flags ({dest: value}, those of `flags` and `shared_flags`
        that were given; the rest keep the config class's defaults). ConfigError (naming fields or
        flags) where they are out of range or one would have no effect."""
        return self.config_class(**{self.field_of(dest): value for dest, value in typed.items()})

    def stages(self, config: Config) -> tuple:
        """The token-reduction stages that change the graph: config.stages() less those that keep every
        vision token (ratio 1: docs/fastmmoe.md 2.1's T is N, so 2.7 merges and 2.8 prunes nothing). The one
        place that no-op rule is: the passes and the FLOPs count read these, whether the configuration came
        from the CLI (which refuses the flags of such a stage) or from the Python API."""
        return tuple(stage for stage in getattr(config, "stages", tuple)() if stage.ratio < 1)

    def passes(self, config: Config) -> list[GraphPass]:
        """The graph passes that apply `config`, in order (none for a configuration that changes nothing:
        a stage of ratio 1 has no pass, and ModalityTopK leaves a router alone where Kv == K)."""
        return []

    def check_program(self, program: ExportedProgram, config: Config) -> None:
        """Raise where `program`'s graph cannot host a stage of `config`, even a stage that keeps every
        token and so inserts nothing (a merge layer with no router is a bad configuration whatever the
        ratio): passes.token_reduction.MergeLayerError / TokenReductionError, before any pass runs."""
        for stage in getattr(config, "stages", tuple)():
            locate_anchors(program.graph, stage)

    def vision_experts(self, config: Config, layer: int, top_k: int) -> int:
        """Experts per vision token at decoder `layer` of a model whose routers pick `top_k`."""
        return top_k

    def stage_flops(self, stage, dims: StageDims) -> int:
        """The FLOPs of a stage itself (config.stages()), beyond the layer's attention and MLP."""
        return 0

    def check_backend(self, config: Config, backend: str) -> None:
        """Raise lower.backends.BackendError where `backend` cannot lower `config`."""

    def bench_config(self, options, keep_ratio: float, num_layers: int) -> Config | None:
        """The configuration of the benchmark's row `{name}-{keep_ratio * 100}` (fastmmoe-compile bench,
        bench/variants.py) on a model of `num_layers` decoder layers; options: the bench's parsed
        arguments (its --config-preset, --fastv-layer). None: the method has no row at this retention
        (the default: a method is benchmarked once it says how)."""
        return None


def flag(dest: str) -> str:
    """The command-line flag of an argparse dest (or of a config field of that name): --dashed-dest."""
    return "--" + dest.replace("_", "-")


METHODS: dict[str, Method] = {}  # by name; --method's choices, in this order


def register(method: Method) -> Method:
    """Add a method (a name already taken is replaced: a user's own FastV, say)."""
    METHODS[method.name] = method
    return method


def method_of(config: Config) -> Method:
    """The registered method whose config_class `config` is. TypeError for any other object."""
    for method in METHODS.values():
        if isinstance(config, method.config_class):
            return method
    raise TypeError(f"{type(config).__name__} is no registered method's configuration "
                    f"(fastmmoe_compile.methods.METHODS: {', '.join(METHODS)})")


def apply_passes(program: ExportedProgram, config: Config) -> tuple[ExportedProgram, PassRecord]:
    """The passes `config` asks for, run on `program`: (rewritten program, PassRecord)."""
    method = method_of(config)
    method.check_program(program, config)
    return run_passes(program, method.passes(config))
