"""Golden graph diffs: what the passes do to the graph, checked in, updated only by --update-golden."""
from pathlib import Path

import pytest

from fastmmoe_compile import FastMMoEConfig
from fastmmoe_compile.api import rewrite
from fastmmoe_compile.config import FastVConfig, SparseVLMConfig

from .conftest import tiny_model

GOLDEN = Path(__file__).parent / "golden"

CASES = {
    "modality_topk-tiny-qwen3-moe": ("tiny-qwen3-moe", FastMMoEConfig(reduce_from_layer=2, vision_expert_ratio=0.5)),
    "modality_topk-tiny-deepseek-v2": ("tiny-deepseek-v2", FastMMoEConfig(reduce_from_layer=2, vision_topk=1)),
    "identity-tiny-mixtral": ("tiny-mixtral", FastMMoEConfig(vision_expert_ratio=1.0)),
    "routing_merge-tiny-qwen3-moe": ("tiny-qwen3-moe", FastMMoEConfig(merge_layers=(1, 3), keep_ratio=0.5)),
    "routing_merge-tiny-deepseek-v2": ("tiny-deepseek-v2", FastMMoEConfig(
        vision_expert_ratio=1.0, merge_layers=(2,), keep_ratio=0.25, strategy="routing", merge_method="mean")),
    "fastv-tiny-qwen3-moe": ("tiny-qwen3-moe", FastVConfig(prune_layer=2, keep_ratio=0.5)),
    "fastv-tiny-glm4-moe": ("tiny-glm4-moe", FastVConfig(prune_layer=1, keep_ratio=0.25)),
    "sparsevlm-tiny-qwen3-moe": ("tiny-qwen3-moe", SparseVLMConfig(prune_layers=(1, 3), keep_ratio=0.25)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_graph_diff_matches_golden(case, update_golden):
    name, config = CASES[case]
    _, _, record = rewrite(tiny_model(name), config)
    path = GOLDEN / f"{case}.txt"
    if update_golden:
        path.write_text(record.graph_diff)
    assert path.exists(), f"no golden file {path}; run pytest --update-golden once and review it"
    assert record.graph_diff == path.read_text()
