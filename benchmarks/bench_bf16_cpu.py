"""bf16 against fp32 prefill on the CPU, in one interleaved run (the CPU twin of the GPU dtype path).

    python benchmarks/bench_bf16_cpu.py --layers 4 --vision 512 --reps 3 --threads 2

The same random weights (the bench-qwen3-moe preset, fp32) and a copy cast to bf16; for each
dtype the unmodified backbone and FastMMoE 50 % (authors' InternVL3.5 settings, merge layers
scaled into the model when --layers is small) as exported programs run eagerly (the `export`
backend) and, with --compile, through torch.compile. Prefill calls are interleaved (order rotated
every rep). Also times a 1024^3 matmul and the expert grouped GEMM (torch._grouped_mm) in each
dtype, to explain the ratio: bf16 pays where the time is in matmuls that have an AVX512-BF16
kernel (oneDNN), not in the memory-bound or fp32-upcast parts (softmax, norms, routing, merge).
The CPU decides the sign: results.json's "cpu" and the first printed line say which capability it
ran on and whether its bf16 GEMMs are native (fastmmoe_compile/runtime/cpu.py, the same verdict
that picks a CPU engine's default dtype). Writes benchmarks/results/bf16_cpu/results.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def rate(fn, flop: float, reps: int = 5) -> float:
    fn()
    secs = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        secs.append(time.perf_counter() - t)
    return flop / statistics.median(secs) / 1e9


def main(argv=None) -> dict:
    from fastmmoe_compile.api import rewrite
    from fastmmoe_compile.bench import build_preset, compile_variant, interleaved
    from fastmmoe_compile.config import FastMMoEConfig, config_preset
    from fastmmoe_compile.models.presets import PRESETS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vision", type=int, default=512)
    p.add_argument("--text", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="also torch.compile (minutes)")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results" / "bf16_cpu"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from fastmmoe_compile.runtime.cpu import bf16_speed, cpu_model

    speed = bf16_speed()
    cpu = {"model": cpu_model(), **speed.as_dict()}
    print(f"[bf16] {cpu['model']}: {speed.describe()}", file=sys.stderr, flush=True)

    fp32 = build_preset(PRESETS["bench-qwen3-moe"], torch.float32, args.layers, torch.device("cpu"))
    bf16 = copy.deepcopy(fp32)
    bf16.lm.to(torch.bfloat16)
    layers = fp32.family.num_layers(fp32.config)
    merge = tuple(m for m in (1, 2, 3) if m < layers) if layers < 13 else (5, 8, 12)
    configs = {"unmodified": FastMMoEConfig(vision_expert_ratio=1.0),
               "fastmmoe-50": config_preset("internvl3.5-30b-a3b", keep_ratio=0.5, merge_layers=merge)}
    seq = args.text + args.vision
    embeds = torch.randn(1, seq, fp32.config.hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(8, 8 + args.vision)[None]
    fns, outs = {}, {}
    for dname, loaded in (("fp32", fp32), ("bf16", bf16)):
        x = (embeds.to(next(loaded.lm.parameters()).dtype), positions)
        for name, cfg in configs.items():
            t = time.perf_counter()
            _, program, _ = rewrite(loaded, cfg)
            fns[(dname, f"eager/{name}")] = (program.module(), x)
            if args.compile:
                fns[(dname, f"compiled/{name}")] = (compile_variant(program, x), x)
            print(f"[bf16] {dname} {name} ready in {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
    with torch.no_grad():
        for k, (fn, x) in fns.items():
            outs[k] = fn(*x)

        def call(fn, x):
            t = time.perf_counter()
            fn(*x)
            return time.perf_counter() - t

        times = interleaved({k: (lambda fn=fn, x=x: call(fn, x)) for k, (fn, x) in fns.items()}, args.reps,
                            lambda m: print(m, file=sys.stderr, flush=True), "prefill")
    rows = []
    for (dname, variant), ts in times.items():
        if dname != "bf16":
            continue
        t16, t32 = statistics.median(ts), statistics.median(times[("fp32", variant)])
        l16, l32 = outs[("bf16", variant)][0].float(), outs[("fp32", variant)][0]
        rows.append({"variant": variant, "fp32_ms": t32 * 1e3, "bf16_ms": t16 * 1e3, "bf16_speedup": t32 / t16,
                     "logits_rel_err": ((l16 - l32).abs().max() / l32.abs().max()).item(),
                     "same_kept": bool(torch.equal(outs[("bf16", variant)][1], outs[("fp32", variant)][1]))})
    n = 1024
    mats = {d: (torch.randn(n, n, dtype=d), torch.randn(n, n, dtype=d)) for d in (torch.float32, torch.bfloat16)}
    mm = {str(d).replace("torch.", ""): rate(lambda a=a, b=b: a @ b, 2 * n ** 3) for d, (a, b) in mats.items()}
    e, h, i, pairs = 64, fp32.config.hidden_size, fp32.config.moe_intermediate_size, 8 * seq
    offs = torch.linspace(pairs / e, pairs, e).round().to(torch.int32)
    gmm = {}
    for d in (torch.float32, torch.bfloat16):
        xg, wg = torch.randn(pairs, h, dtype=d), torch.randn(e, h, 2 * i, dtype=d)
        gmm[str(d).replace("torch.", "")] = rate(lambda xg=xg, wg=wg: torch._grouped_mm(xg, wg, offs=offs),
                                                 2 * pairs * h * 2 * i)
    result = {"args": vars(args), "cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "rows": rows,
              "matmul_gflops": mm, "grouped_mm_gflops": gmm}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"\nbench-qwen3-moe ({layers} layers), {args.text} text + {args.vision} vision tokens, "
          f"{torch.get_num_threads()} threads, {args.reps} reps (medians), on {cpu['model']}: "
          f"{speed.describe()}\n")
    print("| variant | fp32 ms | bf16 ms | bf16 speedup | logits rel. err | same kept tokens |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['fp32_ms']:.0f} | {r['bf16_ms']:.0f} | {r['bf16_speedup']:.2f}x | "
              f"{r['logits_rel_err']:.3f} | {r['same_kept']} |")
    print(f"\nmatmul {n}^3 GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in mm.items())
          + f"; grouped_mm ({pairs} pairs, {e} experts, {h}x{2 * i}) GFLOP/s: "
          + ", ".join(f"{k} {v:.0f}" for k, v in gmm.items()))
    return result


if __name__ == "__main__":
    main()
