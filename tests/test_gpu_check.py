"""benchmarks/gpu_check.py --dry-run: the GPU check's code path on tiny CPU shapes, so that it cannot rot."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--reps", "1",
                           "--decode-steps", "2", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["dry_run"] and result["skipped"] == ["pytest -m gpu"]
    assert [v["same_tokens"] for v in result["vlm"]] == [True] and result["vlm"][0]["manifest_device"] == "cpu"
    rows = {(r["lowering"], r["variant"]): r for r in result["backbone"]["rows"]}
    assert set(rows) == {("eager", "unmodified"), ("eager", "fastmmoe-50"), ("eager", "fastv-50"),
                         ("transformers", "unmodified")}
    assert result["backbone"]["dtype"] == "bfloat16" and result["backbone"]["matmul_tflops"] > 0
    for (lowering, name), r in rows.items():
        assert r["median_ms"] > 0 and r["flops_ratio"] >= 1
        if lowering == "eager":
            assert r["decode_ms_per_step"] > 0 and r["kv_cache_bytes"] > 0
    # Fewer vision tokens after the merges: a smaller KV cache than the unmodified engine's.
    assert rows[("eager", "fastmmoe-50")]["kv_cache_bytes"] < rows[("eager", "unmodified")]["kv_cache_bytes"]
    assert "| eager | fastmmoe-50 |" in (tmp_path / "gpu_check.md").read_text()
