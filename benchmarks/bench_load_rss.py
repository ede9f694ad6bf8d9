"""Peak host memory (RSS) while compiling a checkpoint, against its size on disk (target <= 1.3x).

    PYTHONPATH=. python benchmarks/bench_load_rss.py --gb 3 --dtype bfloat16

Saves a random qwen3_moe checkpoint of about --gb GB with save_pretrained (safetensors; in a
child process, so that this one stays small), then compiles it in a fresh process
(`python -m fastmmoe_compile.cli CKPT --out ENGINE --backend export --no-decode
--reduce-from-layer 1 --quiet --overwrite`, the checkpoint's dtype; --decode and --backend change
that) and reports that process's peak RSS, against the checkpoint's bytes on disk.

How the peak is read: the compiling process reports its own VmHWM (/proc/self/status, the peak
RSS of its address space since exec) when it exits, and a thread in it samples RssAnon (memory
of its own) and RssFile (pages of mapped files, e.g. an mmap-read checkpoint) every 20 ms for
their separate peaks. Not getrusage(RUSAGE_CHILDREN): a child's ru_maxrss includes the RSS of
the parent it was forked from (Linux keeps the pre-exec high-water mark), so a parent that had
just written a 3 GB checkpoint read 3+ GB for a child that only imported the package.

Also reported: the same peak of a process that only imports the package (the baseline every
compile pays), the engine directory's bytes and the compile's wall seconds. JSON on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run in the measured process: samples its RSS, writes the peaks to $FASTMMOE_RSS_OUT at exit,
# then runs the module named by argv[1] as __main__ with the rest of argv.
_WRAPPER = r"""
import atexit, json, os, runpy, sys, threading, time

def _status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out

_peak = {"RssAnon": 0, "RssFile": 0}

def _sample():
    while True:
        s = _status()
        for k in _peak:
            _peak[k] = max(_peak[k], s[k])
        time.sleep(0.02)

def _report():
    s = _status()
    for k in _peak:
        _peak[k] = max(_peak[k], s[k])
    with open(os.environ["FASTMMOE_RSS_OUT"], "w") as f:
        json.dump({"vm_hwm": s["VmHWM"], "peak_anon": _peak["RssAnon"], "peak_file": _peak["RssFile"]}, f)

threading.Thread(target=_sample, daemon=True).start()
atexit.register(_report)
module, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def measured(module: str, args: list[str], work: Path) -> tuple[float, dict]:
    """(wall seconds, {"vm_hwm", "peak_anon", "peak_file"} in bytes) of `python -m module args` in
    a fresh process (PYTHONPATH: this checkout)."""
    report = work / "rss.json"
    report.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FASTMMOE_RSS_OUT": str(report)}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", _WRAPPER, module, *args], check=True, cwd=ROOT, env=env)
    return time.perf_counter() - t, json.loads(report.read_text())


_MAKE_CHECKPOINT = r"""
import sys, torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig
layers, dtype, path = int(sys.argv[1]), getattr(torch, sys.argv[2]), sys.argv[3]
config = Qwen3MoeConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512,
                        num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                        num_experts=64, num_experts_per_tok=8, tie_word_embeddings=False)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(path)
"""


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.5, help="checkpoint size to make (GB)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--keep", default=None, help="keep the checkpoint and engine in this dir (reused if there)")
    p.add_argument("--decode", action="store_true", help="compile the decode program too (the CLI's default)")
    p.add_argument("--backend", default="export", choices=("export", "inductor", "onnx"))
    args = p.parse_args(argv)
    itemsize = {"bfloat16": 2, "float32": 4}[args.dtype]
    work = Path(args.keep or tempfile.mkdtemp(prefix="rss-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt, engine = work / "ckpt", work / "engine"
    hidden, experts, inter = 1024, 64, 512  # as in _MAKE_CHECKPOINT
    per_layer = (3 * experts * hidden * inter + 4 * hidden * hidden) * itemsize
    layers = max(2, round(args.gb * 1e9 / per_layer))
    if not ckpt.exists():
        subprocess.run([sys.executable, "-c", _MAKE_CHECKPOINT, str(layers), args.dtype, str(ckpt)], check=True)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    _, base = measured("fastmmoe_compile.api", [], work)  # importing the package (and torch, transformers)
    # --reduce-from-layer 1: the CLI's default (2) needs 3 layers, a small --gb makes 2.
    command = [str(ckpt), "--out", str(engine), "--backend", args.backend, "--reduce-from-layer", "1",
               "--quiet", "--overwrite", *([] if args.decode else ["--no-decode"])]
    print("[rss] python -m fastmmoe_compile.cli " + " ".join(command), file=sys.stderr)
    secs, peak = measured("fastmmoe_compile.cli", command, work)
    engine_bytes = sum(f.stat().st_size for f in engine.rglob("*") if f.is_file())
    result = {"layers": layers, "dtype": args.dtype, "backend": args.backend, "decode": args.decode,
              "checkpoint_bytes": size, "peak_rss_bytes": peak["vm_hwm"], "ratio": peak["vm_hwm"] / size,
              "peak_anon_bytes": peak["peak_anon"], "peak_file_bytes": peak["peak_file"],
              "import_rss_bytes": base["vm_hwm"], "ratio_above_import": (peak["vm_hwm"] - base["vm_hwm"]) / size,
              "compile_s": round(secs, 1), "engine_bytes": engine_bytes}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
