"""The test process's export cache (tests/compile_cache/export_cache.py), which most tests go through:
a hit is a copy of the same program, never the cached one itself, and a changed model is traced again."""
import torch

from fastmmoe_compile.export import capture
from fastmmoe_compile.models import load_model

from .compile_cache import export_cache


def _graph(program) -> str:
    return str(program.graph)


def test_a_hit_is_an_independent_copy_and_a_changed_model_is_traced_again():
    assert getattr(capture.export_backbone, "_test_cache", False) and export_cache.enabled  # tests/conftest.py
    loaded = load_model("tiny-qwen3-moe")  # this test's own model: nothing else changes it
    misses, hits = export_cache.MISSES, export_cache.HITS
    first = capture.export_backbone(loaded)
    second = capture.export_backbone(loaded)
    assert (export_cache.MISSES - misses, export_cache.HITS - hits) == (1, 1)
    assert second is not first and second.graph is not first.graph and _graph(second) == _graph(first)
    assert second.state_dict is not first.state_dict
    assert all(second.state_dict[k] is first.state_dict[k] for k in first.state_dict)  # the model's tensors

    # A caller that rewrites its copy leaves what a later hit gets as it was.
    second.graph.erase_node(next(n for n in second.graph.nodes if n.op == "output"))
    assert _graph(second) != _graph(first)
    assert _graph(capture.export_backbone(loaded)) == _graph(first)

    # Other arguments, an in-place weight change, a config change: traced again.
    misses = export_cache.MISSES
    capture.export_backbone(loaded, cache=True)
    with torch.no_grad():
        next(loaded.lm.parameters()).add_(1.0)
    capture.export_backbone(loaded)
    loaded.lm.config._attn_implementation = "eager"
    capture.export_backbone(loaded)
    assert export_cache.MISSES - misses == 3


def test_a_test_that_takes_monkeypatch_runs_without_the_cache(monkeypatch):
    assert export_cache.enabled is False  # tests/conftest.py: monkeypatch could change what a trace makes
