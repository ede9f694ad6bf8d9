"""The one command that verifies the GPU path on a short loan of one H100/H200 (<= 8 min wall,
no network, the torch it finds there):

    python benchmarks/gpu_check.py                 # on the GPU machine
    python benchmarks/gpu_check.py --dry-run       # anywhere: tiny shapes on the CPU, same code path (CI runs it)

1. `pytest -m gpu` (the GPU tests; skipped in a dry run).
2. (a) Each tiny VLM preset compiled for cuda (fp32, so that tokens can match exactly): its greedy
   answer to an image + prompt equals the CPU engine's. The first preset is an AOTInductor engine
   (--backend inductor), the others exported programs (--backend export), to fit the loan.
3. (b) The InternVL3.5-30B-A3B backbone shape (preset internvl3.5-30b-a3b-backbone, all 48 layers),
   random bf16 weights made on the GPU, one image of 3328 vision + 64 text tokens: prefill of
   transformers' own model, our unmodified engine, Top-Kv, FastMMoE 75/50/25 % (the authors'
   settings, config_preset) and FastV 50 %, timed interleaved (fastmmoe_compile/bench's machinery): medians,
   speedup, FLOPs ratio (flops.py), efficiency, achieved TFLOP/s against a bf16 matmul timed in
   the same run; decode ms/step; peak GPU memory and KV-cache bytes after prefill per variant.
   Our variants run as exported programs (eager) by default; --compile adds torch.compile.
   A dry run does the same on a 4-layer tiny-qwen3-moe (merge layers 1, 2, 3) in bf16 on the CPU.
Writes gpu_check.json and gpu_check.md to --out-dir. Parts that do not fit --budget-s are
skipped and listed as skipped, never reported as passing.

transformers: the package pins >= 5.23; a machine with an older one (5.17 on the loans seen so
far) runs this with the pure-Python transformers wheel carried beside it (README, "GPU check").
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

TINY_VLMS = ("tiny-internvl", "tiny-qwen3-vl-moe", "tiny-deepseek-vl2", "tiny-glm4v-moe")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (VLMs fp32, backbone bf16): the same code path")
    p.add_argument("--out-dir", default=None, help="default benchmarks/results/gpu_check[_dry]")
    p.add_argument("--vision", type=int, default=None, help="vision tokens (default 3328; dry run 24)")
    p.add_argument("--text", type=int, default=None, help="text tokens (default 64; dry run 16)")
    p.add_argument("--layers", type=int, default=None, help="backbone layers (default all 48; dry run 4)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd variants (minutes of compile)")
    p.add_argument("--vlms", default=None, help=f"comma list of tiny VLM presets (default all: {','.join(TINY_VLMS)}; "
                                                "dry run tiny-internvl)")
    p.add_argument("--variants", default=None,
                   help="comma list of unmodified, topkv, fastmmoe-75/50/25, fastv-50 (default all; dry run "
                        "unmodified,fastmmoe-50,fastv-50)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: pytest, vlm, backbone")
    p.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget; later parts are skipped past it")
    args = p.parse_args(argv)
    dry = args.dry_run
    args.vision = args.vision or (24 if dry else 3328)
    args.text = args.text or (16 if dry else 64)
    args.layers = args.layers or (4 if dry else None)
    args.vlms = [v for v in (args.vlms or ("tiny-internvl" if dry else ",".join(TINY_VLMS))).split(",") if v]
    args.skip = {s for s in args.skip.split(",") if s}
    args.variants = None if args.variants is None and not dry else \
        {"unmodified", *(args.variants or "fastmmoe-50,fastv-50").split(",")}
    args.out_dir = Path(args.out_dir or ROOT / "benchmarks" / "results" / ("gpu_check_dry" if dry else "gpu_check"))
    return args


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def environment(device: torch.device) -> dict:
    import transformers

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
           "device": str(device), "python": sys.version.split()[0]}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


# --- 1. pytest -m gpu -----------------------------------------------------------------------

def run_pytest() -> dict:
    t = time.perf_counter()
    # addopts cleared: pyproject's `-n auto` needs pytest-xdist, which a GPU machine may lack.
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:logging", "-o", "addopts=", "-m", "gpu",
                           "tests"],
                          cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    return {"returncode": proc.returncode, "passed": proc.returncode == 0, "summary": tail[-1] if tail else "",
            "tail": tail, "seconds": time.perf_counter() - t}


# --- 2. tiny VLMs: the device engine's greedy answer == the CPU engine's -----------------------

def test_image(seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))


def check_vlm(preset: str, device: str, backend: str, dtype: torch.dtype, tmp: Path) -> dict:
    from fastmmoe_compile.api import compile_model
    from fastmmoe_compile.config import FastMMoEConfig

    config = FastMMoEConfig(reduce_from_layer=1, vision_expert_ratio=0.5)  # Top-Kv on the vision tokens
    t = time.perf_counter()
    cpu = compile_model(preset, config, out=tmp / f"{preset}-cpu", backend="export", dtype=dtype, quiet=True,
                        device="cpu", overwrite=True)
    target = compile_model(preset, config, out=tmp / f"{preset}-{device}-{backend}", backend=backend, dtype=dtype,
                           quiet=True, device=device, overwrite=True)
    compile_s = time.perf_counter() - t
    prompts, images = ["<image>\nWhat is in the picture?"], [[test_image()]]
    answers = {name: e.generate(images=images, prompts=prompts, max_new_tokens=8)[0]
               for name, e in (("cpu", cpu), (device, target))}
    manifest = json.loads((tmp / f"{preset}-{device}-{backend}" / "manifest.json").read_text())
    return {"preset": preset, "backend": backend, "dtype": str(dtype).replace("torch.", ""),
            "manifest_device": manifest["device"], "answers": answers,
            "same_tokens": answers["cpu"] == answers[device], "compile_s": compile_s}


# --- 3. the real backbone shape -----------------------------------------------------------------

def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, reps: int = 10) -> float:
    """TFLOP/s of an n x n x n matmul (the machine's rate for this dtype, timed in this run)."""
    from fastmmoe_compile.bench import timer

    timed = timer(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    secs = [timed(torch.mm, a, b)[0] for _ in range(reps)]
    return 2 * n ** 3 / statistics.median(secs) / 1e12


def variant_configs(dry: bool) -> dict:
    """Unmodified, Top-Kv, FastMMoE 75/50/25 % (the authors' InternVL3.5 settings), FastV 50 %.
    The dry run's 4-layer model merges at layers 1, 2, 3 instead of 5, 8, 12."""
    from fastmmoe_compile.config import FastMMoEConfig, FastVConfig, config_preset

    over = {"merge_layers": (1, 2, 3)} if dry else {}
    configs = {"unmodified": FastMMoEConfig(vision_expert_ratio=1.0),
               "topkv": FastMMoEConfig(reduce_from_layer=2, vision_expert_ratio=0.5)}
    for r in (0.75, 0.5, 0.25):
        configs[f"fastmmoe-{round(r * 100)}"] = config_preset("internvl3.5-30b-a3b", keep_ratio=r, **over)
    configs["fastv-50"] = FastVConfig(prune_layer=2, keep_ratio=0.5)
    return configs


def kv_bytes(out) -> int:
    """Bytes of the KV cache a prefill returned (every output after logits and kept positions)."""
    return sum(t.numel() * t.element_size() for t in out[2:])


def check_backbone(args, device: torch.device, dtype: torch.dtype) -> dict:
    from fastmmoe_compile import flops
    from fastmmoe_compile.api import rewrite
    from fastmmoe_compile.bench import build_preset, compile_variant, decode_rep, engine_decoder, hf_prefill, \
        interleaved, timer, unmodified_engine
    from fastmmoe_compile.models.presets import PRESETS

    cuda = device.type == "cuda"
    preset = PRESETS["tiny-qwen3-moe" if args.dry_run else "internvl3.5-30b-a3b-backbone"]
    t0 = time.perf_counter()
    loaded = build_preset(preset, dtype, args.layers, device)
    num_layers = loaded.family.num_layers(loaded.config)
    weights = torch.cuda.memory_allocated() if cuda else 0
    log(f"built {loaded.source}: {num_layers} layers, {dtype}, {device} in {time.perf_counter() - t0:.0f}s")
    configs = {k: c for k, c in variant_configs(args.dry_run).items() if args.variants is None or k in args.variants}
    seq, prefix = args.text + args.vision, 8
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, seq, loaded.config.hidden_size, generator=gen).to(device, dtype),
              torch.arange(prefix, prefix + args.vision)[None].to(device))
    timed = timer(device)

    fns, setup = {}, {}
    engine = unmodified_engine(loaded, configs["unmodified"], "eager", decode=True)  # compile_model(out=None)
    fns[("eager", "unmodified")] = engine.backbone
    for name, cfg in configs.items():
        if name == "unmodified":
            continue
        t = time.perf_counter()
        _, program, _ = rewrite(loaded, cfg, cache=True)
        fns[("eager", name)] = program.module()
        if args.compile:
            fns[("compiled", name)] = compile_variant(program, inputs)
        setup[name] = time.perf_counter() - t
        log(f"{name}: rewritten in {setup[name]:.0f}s")
    if args.compile:
        fns[("compiled", "unmodified")] = unmodified_engine(loaded, configs["unmodified"], "compiled", True).backbone
    fns[("transformers", "unmodified")] = hf_prefill(loaded)

    memory, outs = {}, {}
    with torch.no_grad():
        for key, fn in fns.items():  # warm-up, and per variant: peak memory and KV-cache bytes
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            outs[key] = fn(*inputs)
            if cuda:
                torch.cuda.synchronize()
            memory[key] = {"peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
                           "peak_above_weights_bytes": torch.cuda.max_memory_allocated() - weights if cuda else None,
                           "kv_cache_bytes": kv_bytes(outs[key]) if key[0] != "transformers" else None}
        times = interleaved({k: (lambda fn=fn: timed(fn, *inputs)[0]) for k, fn in fns.items()}, args.reps,
                            lambda m: log(m), "prefill")
    starts = {k: engine_decoder(engine, outs[k], seq, args.decode_steps) for k in fns if k[0] != "transformers"}
    decode_rep(starts, args.decode_steps, timed, 0)  # warm-up
    decode = {k: [] for k in starts}
    for r in range(max(1, args.reps // 2)):
        for k, ts in decode_rep(starts, args.decode_steps, timed, r)[0].items():
            decode[k] += ts

    n = 8192 if cuda else 512
    peak = matmul_tflops(device, dtype, n)
    reports = {name: flops.analytic_flops(loaded, None if name == "unmodified" else cfg, args.text, args.vision)
               for name, cfg in configs.items()}
    rows = []
    for (lowering, name), ts in times.items():
        base = statistics.median(times[("eager" if lowering == "transformers" else lowering, "unmodified")])
        med = statistics.median(ts)
        ratio = reports["unmodified"].total / reports[name].total
        row = {"lowering": lowering, "variant": name, "median_ms": med * 1e3, "speedup": base / med,
               "flops": reports[name].total, "flops_ratio": ratio, "efficiency": base / med / ratio,
               "tflops": reports[name].total / med / 1e12, "matmul_share": reports[name].total / med / 1e12 / peak,
               "speedup_vs_transformers": statistics.median(times[("transformers", "unmodified")]) / med,
               **memory[(lowering, name)]}
        if (lowering, name) in decode:
            row["decode_ms_per_step"] = statistics.median(decode[(lowering, name)]) * 1e3
        rows.append(row)
    return {"model": loaded.describe(), "layers": num_layers, "vision": args.vision, "text": args.text,
            "dtype": str(dtype).replace("torch.", ""), "matmul_tflops": peak, "matmul_n": n, "rows": rows,
            "rewrite_s": setup, "weights_bytes": weights if cuda else None, "targets": targets(rows)}


def targets(rows: list[dict]) -> dict:
    """The issue's GPU targets, evaluated on this run's rows (eager lowering)."""
    by = {(r["lowering"], r["variant"]): r for r in rows}
    fast = [r for r in rows if r["lowering"] == "eager" and r["variant"].startswith("fastmmoe")]
    base = by[("eager", "unmodified")]
    return {
        "efficiency_ge_0.9": {r["variant"]: r["efficiency"] >= 0.9 for r in fast},
        "unmodified_ge_40pct_matmul": base["matmul_share"] >= 0.4,
        "faster_than_transformers_by_more_than_flops_ratio": {
            r["variant"]: r["speedup_vs_transformers"] > r["flops_ratio"] for r in fast},
        "decode_no_worse": {r["variant"]: r.get("decode_ms_per_step", 0) <= base.get("decode_ms_per_step", 0) * 1.05
                            for r in fast},
    }


def markdown(result: dict) -> str:
    lines = [f"# GPU check ({'dry run, ' if result['dry_run'] else ''}{result['environment'].get('gpu', 'cpu')})", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in result["environment"].items()), ""]
    if "pytest" in result:
        lines += [f"pytest -m gpu: {result['pytest']['summary']} (rc {result['pytest']['returncode']})", ""]
    if result.get("vlm"):
        lines += ["| tiny VLM | backend | dtype | manifest device | same greedy tokens as CPU |", "|---|---|---|---|---|"]
        lines += [f"| {v['preset']} | {v['backend']} | {v['dtype']} | {v['manifest_device']} | {v['same_tokens']} |"
                  for v in result["vlm"]]
        lines.append("")
    b = result.get("backbone")
    if b:
        lines += [f"Backbone {b['model']['source']} ({b['layers']} layers), {b['vision']} vision + {b['text']} text "
                  f"tokens, {b['dtype']}; {b['dtype']} matmul {b['matmul_n']}^3: {b['matmul_tflops']:.1f} TFLOP/s", "",
                  "| lowering | variant | median ms | speedup | FLOPs ratio | efficiency | TFLOP/s | % of matmul | "
                  "vs transformers | decode ms/step | peak GiB | KV cache MiB |", "|---" * 12 + "|"]
        for r in b["rows"]:
            gib = "" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2 ** 30:.1f}"
            kv = "" if r["kv_cache_bytes"] is None else f"{r['kv_cache_bytes'] / 2 ** 20:.1f}"
            dec = f"{r['decode_ms_per_step']:.2f}" if "decode_ms_per_step" in r else ""
            lines.append(f"| {r['lowering']} | {r['variant']} | {r['median_ms']:.1f} | {r['speedup']:.2f}x | "
                         f"{r['flops_ratio']:.2f}x | {r['efficiency']:.2f} | {r['tflops']:.1f} | "
                         f"{r['matmul_share'] * 100:.0f}% | {r['speedup_vs_transformers']:.2f}x | {dec} | {gib} | {kv} |")
        lines += ["", "Targets: " + json.dumps(b["targets"])]
    if result["skipped"]:
        lines += ["", "Skipped (not verified): " + ", ".join(result["skipped"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import tempfile

    args = parse_args(argv)
    start = time.perf_counter()
    cuda = not args.dry_run
    if cuda and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA GPU here (torch.cuda.is_available() is False): run it on a GPU machine, "
              "or pass --dry-run", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    result = {"dry_run": args.dry_run, "environment": environment(device), "skipped": []}
    left = lambda: args.budget_s - (time.perf_counter() - start)  # noqa: E731

    if "pytest" in args.skip or args.dry_run:
        result["skipped"].append("pytest -m gpu")
    else:
        log("pytest -m gpu ...")
        result["pytest"] = run_pytest()
        log(f"pytest: {result['pytest']['summary']}")
    result["vlm"] = []
    if "vlm" not in args.skip:
        with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
            for i, preset in enumerate(args.vlms):
                if left() < (240 if cuda else 0):  # keep the backbone's share of the loan
                    result["skipped"].append(f"vlm {preset}")
                    continue
                backend = "inductor" if cuda and i == 0 else "export"
                log(f"{preset} ({backend}) ...")
                result["vlm"].append(check_vlm(preset, device.type, backend, torch.float32, Path(tmp)))
                log(f"{preset}: same tokens as cpu: {result['vlm'][-1]['same_tokens']}")
    if "backbone" in args.skip:
        result["skipped"].append("backbone")
    else:
        result["backbone"] = check_backbone(args, device, torch.bfloat16)  # the GPU's dtype (CPU: its twin)
    result["total_s"] = time.perf_counter() - start
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
    text = markdown(result)
    (args.out_dir / "gpu_check.md").write_text(text)
    print(text)
    failed = (not result.get("pytest", {}).get("passed", True)) or not all(v["same_tokens"] for v in result["vlm"])
    log(f"done in {result['total_s']:.0f}s; results in {args.out_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
