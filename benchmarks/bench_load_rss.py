"""Peak host memory (RSS) while compiling a checkpoint, against its size on disk (target <= 1.3x).

    python benchmarks/bench_load_rss.py --gb 1.5 --dtype bfloat16

Saves a random qwen3_moe checkpoint of about --gb GB with save_pretrained (safetensors), then
compiles it in a fresh process (`fastmmoe-compile CKPT --out ENGINE --backend export
--no-decode`, the checkpoint's dtype) and reads that process's peak RSS (getrusage of the child).
Reports the ratio peak RSS / checkpoint bytes, the engine directory's size and the compile time.
The baseline RSS of a process that only imports the package is measured the same way and reported.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(code_or_args: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of a fresh Python process running the arguments."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    subprocess.run([sys.executable, *code_or_args], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, the largest child so far
    if peak <= before:
        print("[rss] warning: an earlier child had a larger peak than this one", file=sys.stderr)
    return time.perf_counter() - t, peak * 1024


def main(argv=None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.5, help="checkpoint size to make (GB)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--keep", default=None, help="keep the checkpoint and engine in this dir")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    work = Path(args.keep or tempfile.mkdtemp(prefix="rss-"))
    ckpt, engine = work / "ckpt", work / "engine"
    hidden, experts, inter = 1024, 64, 512
    per_layer = (3 * experts * hidden * inter + 4 * hidden * hidden) * dtype.itemsize
    layers = max(2, round(args.gb * 1e9 / per_layer))
    config = Qwen3MoeConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=2048, moe_intermediate_size=inter,
                            num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                            num_experts=experts, num_experts_per_tok=8, tie_word_embeddings=False)
    if not ckpt.exists():
        AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(ckpt)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    _, base = child(["-c", "import fastmmoe_compile.api"])  # first: RUSAGE_CHILDREN keeps the largest child
    secs, peak = child(["-m", "fastmmoe_compile.cli", str(ckpt), "--out", str(engine), "--backend", "export",
                        "--no-decode", "--quiet", "--overwrite"])
    engine_bytes = sum(f.stat().st_size for f in engine.rglob("*") if f.is_file())
    result = {"layers": layers, "dtype": args.dtype, "checkpoint_bytes": size, "peak_rss_bytes": peak,
              "ratio": peak / size, "import_rss_bytes": base, "compile_s": secs, "engine_bytes": engine_bytes}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
