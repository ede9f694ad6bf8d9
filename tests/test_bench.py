"""Smoke test of the benchmark core (fastmmoe_compile/bench/, `fastmmoe-compile bench`): a
tiny model through prefill + decode timing, eager only, unmodified and FastV. The decode path must give
transformers' own greedy tokens (DynamicCache) on the unmodified backbone."""
import json

import torch

from fastmmoe_compile.bench import main
from fastmmoe_compile.cli import main as cli


def test_bench_prefill_and_decode(tmp_path):
    out = tmp_path / "results"
    threads = torch.get_num_threads()
    try:
        # FastV (pruned, per-layer cache lengths) only: the merge passes take ~20 s to run on 9 layers.
        result = main(["--preset", "tiny-qwen3-moe", "--vision", "24", "--text", "8", "--keep-ratios", "0.5",
                       "--variants", "fastv", "--reps", "1", "--decode-steps", "3", "--no-compile", "--no-profile",
                       "--threads", "1", "--out-dir", str(out)])
    finally:
        torch.set_num_threads(threads)
    rows = {(r["lowering"], r["variant"]): r for r in result["rows"]}
    assert set(rows) == {("eager", "unmodified"), ("eager", "fastv-50"), ("transformers", "unmodified")}
    for r in rows.values():
        assert r["decode_steps"] == 3 and r["decode_tokens_per_s"] > 0 and r["median_ms"] > 0
    # FastV's layers after 2 cache 12 of the 24 vision tokens; the unmodified engine decodes HF's tokens.
    assert rows[("eager", "fastv-50")]["vision_after"] == 12
    tokens = result["decode_tokens"]
    assert tokens["eager/unmodified"] == tokens["transformers/unmodified"] and len(tokens["eager/unmodified"]) == 3
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"][0]["decode_ms_per_step"] == rows[("eager", "unmodified")]["decode_ms_per_step"]
    assert "decode tok/s" in (out / "table.md").read_text()


def test_bench_cli_errors(capsys):
    assert cli(["bench", "--preset", "tiny-qwen3-moe", "--variants", "nosuch"]) == 2
    assert "unknown variants" in capsys.readouterr().err
    assert cli(["bench", "--preset", "internvl3.5-30b-a3b-backbone"]) == 2  # real-size: GPU only
    assert "--device cuda" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli(["bench", "--device", "cuda"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
