"""benchmarks/gpu_check.py --dry-run: the GPU check's code path on tiny CPU shapes, so that it cannot rot."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.aoti("the GPU check's aoti part compiles the engines users deploy (in its subprocess)")
def test_gpu_check_dry_run(tmp_path):
    """Every part but pytest -m gpu passes; the AOTInductor part compiles, writes and loads both engines."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--reps", "1",
                           "--decode-steps", "2", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["dry_run"] and result["skipped"] == ["pytest -m gpu"]
    assert {n: p["status"] for n, p in result["parts"].items()} == \
        {"pytest": "skipped", "backbone": "passed", "aoti": "passed", "vlm": "passed"}
    assert [v["same_tokens"] for v in result["vlm"]] == [True] and result["vlm"][0]["manifest_device"] == "cpu"
    backbone = result["backbone"]
    rows = {(r["lowering"], r["variant"]): r for r in backbone["rows"]}
    assert set(rows) == {("eager", "unmodified"), ("eager", "fastmmoe-50"), ("eager", "fastv-50"),
                         ("transformers", "unmodified")}
    assert backbone["dtype"] == "bfloat16" and backbone["matmul_tflops"] > 0
    assert set(backbone["rewrite_s"]) == {"unmodified", "fastmmoe-50", "fastv-50"}  # one export, three rewrites
    assert backbone["sdpa_kernel"]["engine (repeated K/V, bool mask)"] in ("FLASH_ATTENTION", "MATH")
    for (lowering, name), r in rows.items():
        assert r["median_ms"] > 0 and r["flops_ratio"] >= 1 and r["decode_ms_per_step"] > 0
        if lowering == "eager":
            assert r["kv_cache_bytes"] > 0
    # Fewer vision tokens after the merges: a smaller KV cache than the unmodified engine's.
    assert rows[("eager", "fastmmoe-50")]["kv_cache_bytes"] < rows[("eager", "unmodified")]["kv_cache_bytes"]
    aoti = {(r["lowering"], r["variant"]): r for r in result["aoti"]["rows"]}
    assert set(aoti) == {("aoti", "unmodified"), ("aoti", "fastmmoe-50"), ("transformers", "unmodified")}
    assert all(r["median_ms"] > 0 and r["decode_ms_per_step"] > 0 for r in aoti.values())
    assert aoti[("aoti", "fastmmoe-50")]["kv_cache_bytes"] < aoti[("aoti", "unmodified")]["kv_cache_bytes"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| eager | fastmmoe-50 |" in md and "| aoti | fastmmoe-50 |" in md and "| aoti | passed |" in md


def _gpu_check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failing_part_leaves_the_other_parts_results_on_disk(tmp_path, monkeypatch):
    """The harness, with each part's work replaced (this checks the isolation and the saving, not the
    measurements): the backbone part saves a variant, then crashes; the aoti part is broken on purpose
    (--fail-part); the vlm part still runs, and every result, the crash's one-line cause included, is
    in gpu_check.json and gpu_check.md, as they were on disk while the next part ran."""
    gc = _gpu_check_module()
    seen_on_disk = {}

    def broken_backbone(args, device, dtype, out, save):
        out.update({"rewrite_s": {"fastmmoe-50": 1.5}})
        save()
        seen_on_disk["backbone"] = json.loads((tmp_path / "gpu_check.json").read_text())["backbone"]
        raise ValueError("shape mismatch in layer 7\nsecond line of the message")

    def vlm(preset, device, backend, dtype, tmp):
        seen_on_disk["parts"] = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
        return {"preset": preset, "backend": backend, "dtype": "float32", "manifest_device": device,
                "answers": {}, "same_tokens": True, "compile_s": 0.0}

    monkeypatch.setattr(gc, "check_backbone", broken_backbone)
    monkeypatch.setattr(gc, "check_vlm", vlm)
    code = gc.main(["--dry-run", "--out-dir", str(tmp_path), "--fail-part", "aoti"])
    assert code == 1
    assert seen_on_disk["backbone"] == {"rewrite_s": {"fastmmoe-50": 1.5}}  # saved before the crash
    assert seen_on_disk["parts"]["backbone"]["status"] == "failed"  # on disk while vlm ran
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = result["parts"]
    assert parts["backbone"] == {**parts["backbone"], "status": "failed",
                                 "error": "ValueError: shape mismatch in layer 7"}
    assert parts["aoti"]["status"] == "failed" and "--fail-part aoti" in parts["aoti"]["error"]
    assert parts["vlm"]["status"] == "passed" and parts["pytest"]["status"] == "skipped"
    assert [v["preset"] for v in result["vlm"]] == ["tiny-internvl"]
    assert result["backbone"]["rewrite_s"] == {"fastmmoe-50": 1.5}
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| backbone | failed |" in md and "ValueError: shape mismatch in layer 7" in md
    assert "| vlm | passed |" in md


def test_gpu_check_refuses_unknown_parts_and_variants():
    gc = _gpu_check_module()
    for argv in (["--skip", "backbon"], ["--variants", "fastmmoe-60"]):
        with pytest.raises(SystemExit) as e:
            gc.parse_args(argv)
        assert e.value.code == 2


def test_plan_times_each_tracing_step_at_the_real_shape(tmp_path):
    """--plan: the 30B backbone shape (here 3 of its 48 layers) with fake bf16 weights: one export, each
    variant's passes on a copy, the decode export, each timed."""
    gc = _gpu_check_module()
    assert gc.main(["--plan", "--layers", "3", "--variants", "unmodified,topkv", "--out-dir", str(tmp_path)]) == 0
    plan = json.loads((tmp_path / "gpu_check_plan.json").read_text())
    assert plan["layers"] == 3 and plan["variants"] == ["unmodified", "topkv"]
    assert set(plan["seconds"]) == {"build (fake weights)", "export", "passes unmodified", "passes topkv",
                                    "export decode", "total"}
    assert all(v > 0 for v in plan["seconds"].values())
