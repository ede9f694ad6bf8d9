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

    def bench_config(self, options, keep_ratio, num_layers):
        return HalveConfig(halve_layer=num_layers - 1) if keep_ratio == 0.5 else None


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


def test_a_ratio_of_one_is_the_same_graph_from_the_api_and_the_cli(capsys):
    """A stage that keeps every vision token is no stage (Method.stages): through the Python API it adds no
    merge op and no FLOPs, and the graph is the one the CLI compiles for --keep-ratio 1 (the default, where
    the CLI refuses --merge-layers as having no effect). The same for FastV and SparseVLM at keep_ratio 1."""
    from fastmmoe_compile.config import FastVConfig, SparseVLMConfig

    loaded = load_model("tiny-qwen3-moe")
    _, plain, plain_record = rewrite(loaded, FastMMoEConfig())
    for config in (FastMMoEConfig(merge_layers=(1, 2), keep_ratio=1.0),
                   FastMMoEConfig(merge_layers=(1, 2), stage_ratios=(1.0, 1.0), authors_compat=True)):
        _, program, record = rewrite(loaded, config)
        assert str(program.graph) == str(plain.graph)
        assert record.graph_diff == plain_record.graph_diff
        assert [p["pass"] for p in record.passes] == ["modality_topk"]
        assert flops.analytic_flops(loaded, config, 10, 40).layers == flops.analytic_flops(
            loaded, FastMMoEConfig(), 10, 40).layers
    assert main(["diff", "tiny-qwen3-moe"]) == 0
    assert capsys.readouterr().out == plain_record.graph_diff
    assert main(["diff", "tiny-qwen3-moe", "--merge-layers", "1,2"]) == 2
    assert "--merge-layers has no effect while every stage keeps all vision tokens" in capsys.readouterr().err

    # A ratio-1 stage among others is dropped alone: the graph of the other stage only.
    _, mixed, _ = rewrite(loaded, FastMMoEConfig(merge_layers=(1, 2), stage_ratios=(1.0, 0.5)))
    _, single, _ = rewrite(loaded, FastMMoEConfig(merge_layers=(2,), keep_ratio=0.5))
    assert str(mixed.graph) == str(single.graph)

    unmodified = export_backbone(loaded)
    for config in (FastVConfig(prune_layer=1, keep_ratio=1.0), SparseVLMConfig(prune_layers=(1, 2), keep_ratio=1.0)):
        _, program, record = rewrite(loaded, config)
        assert str(program.graph) == str(unmodified.graph) and not record.passes


def test_the_bench_rows_come_from_the_registry(halve):
    """bench.variant_configs asks every method for its rows (Method.bench_config): the toy method's
    row is there at the retention it answers for, and --variants takes its name as a group."""
    from types import SimpleNamespace

    from fastmmoe_compile import bench

    args = SimpleNamespace(keep_ratios="0.75,0.5", config_preset="internvl3.5-30b-a3b", fastv_layer=2,
                           variants="unmodified,halve")
    assert bench.variant_configs(args, 4) == {"unmodified": FastMMoEConfig(vision_expert_ratio=1.0),
                                              "halve-50": HalveConfig(halve_layer=3)}
    args.variants = "fastv,sparsevlm,fastmmoe"
    rows = bench.variant_configs(args, 48)
    assert list(rows) == ["unmodified", "fastmmoe-75", "fastv-75", "sparsevlm-75", "fastmmoe-50", "fastv-50",
                          "sparsevlm-50"]
