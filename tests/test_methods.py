"""methods/: a method registered from outside the package (this file alone) is a --method of the CLI,
rewritten by rewrite() and counted by flops like the built-in ones; each rule answers once."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from fastmmoe_compile import flops
from fastmmoe_compile.api import rewrite
from fastmmoe_compile.cli import main
from fastmmoe_compile.config import ConfigError, FastMMoEConfig, MergeStage
from fastmmoe_compile.export import export_backbone
from fastmmoe_compile.methods import METHODS, Method, apply_passes, method_of
from fastmmoe_compile.models import load_model
from fastmmoe_compile.passes.token_reduction import TokenReduction


@dataclass(frozen=True)
class HalveConfig:
    """Prune half the vision tokens by last-token attention at one layer (FastV's stage, its own method)."""

    halve_layer: int = 1

    def check_model(self, num_layers: int, top_k: int) -> None:
        if self.halve_layer >= num_layers:
            raise ConfigError(f"halve_layer={self.halve_layer} is out of range: the model has {num_layers} layers")

    def stages(self) -> tuple[MergeStage, ...]:
        return (MergeStage(layer=self.halve_layer, ratio=0.5, merge_ratio=0.0, window=2, alpha=0.0,
                           strategy="attention", method="mean", use_router=False),)

    def to_dict(self) -> dict:
        return {"method": "halve", "halve_layer": self.halve_layer}


class Halve(Method):
    name = "halve"
    label = "Halve"
    config_class = HalveConfig
    help = "a test's own method (--halve-layer)"
    flags = ("halve_layer",)

    def add_flags(self, parser):
        parser.add_argument("--halve-layer", type=int, default=None, help="Halve: the layer that prunes")

    def passes(self, config):
        return [TokenReduction(config.stages(), name="halve")]

    def stage_flops(self, stage, dims):
        return 7 * dims.tokens  # a marker: flops.py asks the method, it knows no formula of its own


@pytest.fixture
def halve(monkeypatch):
    monkeypatch.setitem(METHODS, "halve", Halve())
    return METHODS["halve"]


def test_a_registered_method_is_a_cli_method(halve, capsys):
    assert main(["diff", "tiny-qwen3-moe", "--method", "halve", "--halve-layer", "2"]) == 0
    out = capsys.readouterr().out
    assert "layer 2:\n" in out and "fastmmoe.merge_tokens" in out and "N1 = min(N, max(1, floor(N * 0.5)))" in out
    assert main(["flops", "tiny-qwen3-moe", "--method", "halve", "--vision-tokens", "40", "--text-tokens", "10"]) == 0
    assert "## Halve" in capsys.readouterr().out


def test_its_flags_are_its_own(halve, capsys):
    assert main(["diff", "tiny-qwen3-moe", "--halve-layer", "2"]) == 2
    assert "fastmmoe-compile: error: --halve-layer needs --method halve" in capsys.readouterr().err
    assert main(["diff", "tiny-qwen3-moe", "--method", "halve", "--window", "3"]) == 2
    assert "--method halve takes --halve-layer only, not --window" in capsys.readouterr().err
    assert main(["diff", "tiny-qwen3-moe", "--method", "halve", "--halve-layer", "9"]) == 2  # its own check_model
    assert "--halve-layer 9 is out of range" in capsys.readouterr().err


def test_rewrite_and_flops_ask_the_method(halve):
    loaded = load_model("tiny-qwen3-moe")
    config = HalveConfig(halve_layer=1)
    _, program, record = rewrite(loaded, config)
    assert [(p["pass"], p["modified"]) for p in record.passes] == [("halve", True)]
    assert any(n.target == torch.ops.fastmmoe.merge_tokens.default for n in program.graph.nodes)
    report = flops.analytic_flops(loaded, config, 10, 40)
    assert [row.vision for row in report.layers] == [40, 40, 20, 20]  # the stage's own count, after layer 1
    assert report.layers[1].merge == 7 * 50 and sum(row.merge for row in report.layers) == 7 * 50


def test_an_unregistered_configuration_is_refused():
    with pytest.raises(TypeError, match="HalveConfig is no registered method's configuration"):
        method_of(HalveConfig())


def test_vision_topk_above_k_is_one_answer_everywhere():
    """The CLI, rewrite (check_model), the pass and the FLOPs count all refuse Kv > K (FastMMoEConfig.kv)."""
    loaded = load_model("tiny-qwen3-moe")  # top-k 4
    config = FastMMoEConfig(reduce_from_layer=1, vision_topk=6)
    with pytest.raises(ConfigError, match=r"vision_topk=6 exceeds the model's top-k \(4\)"):
        rewrite(loaded, config)
    with pytest.raises(ConfigError, match=r"vision_topk=6 exceeds the model's top-k \(4\)"):
        flops.analytic_flops(loaded, config, 10, 40)
    with pytest.raises(ConfigError, match=r"vision_topk=6 exceeds the model's top-k \(4\)"):
        apply_passes(export_backbone(loaded), config)  # without check_model: the pass asks kv() too


def test_flops_json_names_the_method(halve, capsys):
    assert main(["flops", "tiny-qwen3-moe", "--method", "halve", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"] == {"method": "halve", "halve_layer": 1}
