"""Real-size graphs on the meta device: export and passes without the weights in memory."""
import resource


from fastmmoe_compile import FastMMoEConfig, compile_model
from fastmmoe_compile.api import rewrite

import pytest


def test_internvl35_30b_backbone_rewrites_on_meta():
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    loaded, program, record = rewrite("internvl3.5-30b-a3b-backbone", FastMMoEConfig())
    assert loaded.on_meta
    params = sum(p.numel() for p in loaded.lm.parameters())
    assert params > 30e9  # the real shape: ~30.5B parameters, none of them in memory
    grown_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 2**20
    assert grown_gib < 4, f"meta export should not hold weights; RSS grew {grown_gib:.1f} GiB"
    changes = record.passes[0]["changes"]
    assert [c["layer"] for c in changes] == list(range(2, 48))
    assert all(c["top_k"] == 8 and c["kv"] == 4 for c in changes)
    assert "layers 2-47:" in record.graph_diff and "[-4*B*N + 8*B*S]" in record.graph_diff


def test_meta_models_cannot_become_engines(tmp_path):
    with pytest.raises(ValueError, match="meta device"):
        compile_model("deepseek-vl2-small-backbone", out=tmp_path / "e", backend="export", quiet=True)
    assert not (tmp_path / "e").exists()
