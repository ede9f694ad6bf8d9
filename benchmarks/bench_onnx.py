"""Prefill latency: the rewritten ExportedProgram (eager) vs the ONNX Runtime engine (CPU),
unmodified vs Top-Kv, one model with the same weights and inputs (fp32). Decode: ms per step of
the one-token decode program (export/decode.py) over a cache of the prompt's length, the
exported program vs decode.onnx under ORT, both driven by runtime/generate.decode_step.

Repetitions are interleaved (the order rotates) so noise from other processes hits every
variant alike; medians and ratios are reported. Both runtimes get the same thread count.

    python benchmarks/bench_onnx.py                       # bench-qwen3-moe cut to 4 layers (~4 min on 2 cores)
    python benchmarks/bench_onnx.py --layers 2 --reps 3   # a quick run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastmmoe_compile.bench import time_prefill

sys.path.insert(0, str(Path(__file__).parent))
from bench_topkv import build  # noqa: E402  (the same preset builder, with --layers)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench-qwen3-moe")
    p.add_argument("--layers", type=int, default=4, help="override num_hidden_layers (the ONNX file holds all weights)")
    p.add_argument("--vision", type=int, default=1024)
    p.add_argument("--text", type=int, default=64)
    p.add_argument("--prefix", type=int, default=8, help="text tokens before the image")
    p.add_argument("--reduce-from-layer", type=int, default=2)
    p.add_argument("--ratio", type=float, default=0.5, help="vision_expert_ratio")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode-steps", type=int, default=32, help="decode steps timed per runtime (0: skip decode)")
    p.add_argument("--out", default="benchmarks/results/onnx_cpu.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    from fastmmoe_compile import flops
    from fastmmoe_compile.api import rewrite
    from fastmmoe_compile.config import FastMMoEConfig
    from fastmmoe_compile.lower.onnx import export_onnx
    from fastmmoe_compile.runtime.onnx_runtime import OrtBackbone

    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    loaded = build(args.preset, args.layers)
    config = FastMMoEConfig(reduce_from_layer=args.reduce_from_layer, vision_expert_ratio=args.ratio)
    programs = {"unmodified": rewrite(loaded, FastMMoEConfig(args.reduce_from_layer, vision_expert_ratio=1.0))[1],
                "topkv": rewrite(loaded, config)[1]}
    seq = args.text + args.vision
    embeds = torch.randn(1, seq, loaded.config.hidden_size, generator=torch.Generator().manual_seed(0))
    inputs = (embeds, torch.arange(args.prefix, args.prefix + args.vision)[None])

    variants, export_s = {}, {}
    with tempfile.TemporaryDirectory() as d:
        for name, program in programs.items():
            variants[("export", name)] = program.module()
            t = time.perf_counter()
            path = export_onnx(program, Path(d) / f"{name}.onnx")
            export_s[name] = time.perf_counter() - t
            variants[("onnxruntime", name)] = OrtBackbone(path, threads=args.threads)
            log(f"[bench] onnx export {name}: {export_s[name]:.0f}s")
        decode = bench_decode(loaded, args, Path(d), log) if args.decode_steps > 0 else None
    with torch.no_grad():
        ref = {k: fn(*inputs)[0] for k, fn in variants.items()}  # also the warm-up
        times = time_prefill(variants, inputs, args.reps, log)  # interleaved reps, the order rotated

    cmp = flops.compare(loaded, config, args.text, args.vision)
    rows = []
    for (runtime, name), ts in times.items():
        med, base = statistics.median(ts), statistics.median(times[(runtime, "unmodified")])
        fr = cmp["ratio"] if name == "topkv" else 1.0
        rows.append({"runtime": runtime, "variant": name, "median_ms": med * 1e3, "min_ms": min(ts) * 1e3,
                     "all_ms": [t * 1e3 for t in ts], "speedup": base / med, "flops_ratio": fr,
                     "efficiency": base / med / fr,
                     "vs_export": statistics.median(times[("export", name)]) / med})
    diffs = {name: (ref[("onnxruntime", name)] - ref[("export", name)]).abs().max().item() for name in programs}
    table = ["| runtime | variant | median ms | min ms | Top-Kv speedup | FLOPs ratio | efficiency | vs export |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['runtime']} | {r['variant']} | {r['median_ms']:.0f} | {r['min_ms']:.0f} | {r['speedup']:.2f}x "
                     f"| {r['flops_ratio']:.2f}x | {r['efficiency']:.2f} | {r['vs_export']:.2f}x |")
    print(f"\n{loaded.source}: batch 1, {args.text} text + {args.vision} vision tokens, fp32, {args.threads} threads, "
          f"Kv={config.kv(loaded.family.top_k(loaded.config))} from layer {args.reduce_from_layer}, "
          f"{args.reps} reps (medians), onnxruntime {ort.__version__}\n")
    print("\n".join(table))
    print("\nmax |logit diff| onnxruntime vs export: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    if decode:
        print(f"\ndecode, batch 1, cache of {seq} tokens per layer, {args.decode_steps} steps (medians): "
              + ", ".join(f"{k} {v:.2f} ms/step" for k, v in decode["ms_per_step"].items())
              + f"; ORT {decode['ms_per_step']['export'] / decode['ms_per_step']['onnxruntime']:.2f}x the exported "
              f"program; max |logit diff| {decode['max_abs_logit_diff']:.2e}")
    result = {"args": vars(args), "model": loaded.describe(), "onnxruntime": ort.__version__,
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "torch": torch.__version__},
              "rows": rows, "flops": cmp, "onnx_export_s": export_s, "max_abs_logit_diff": diffs, "decode": decode,
              "table": "\n".join(table)}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        log(f"[bench] wrote {args.out}")
    return result


def bench_decode(loaded, args, d: Path, log) -> dict:
    """ms per decode step, the exported step vs decode.onnx, from one random cache of the prompt's length.
    Top-Kv leaves decode alone (decode tokens are text tokens), so one measurement serves both variants."""
    import copy

    from fastmmoe_compile.export.decode import example_decode_inputs, export_decode
    from fastmmoe_compile.lower.onnx import export_onnx
    from fastmmoe_compile.runtime.generate import DecodeState, decode_step
    from fastmmoe_compile.runtime.onnx_runtime import OrtDecodeStep

    program = export_decode(loaded)
    t = time.perf_counter()
    steps = {"export": program.module(),
             "onnxruntime": OrtDecodeStep(export_onnx(program, d / "decode.onnx"), threads=args.threads)}
    log(f"[bench] onnx export decode step: {time.perf_counter() - t:.0f}s")
    _, _, keys, values, _ = example_decode_inputs(loaded, batch=1)  # per-layer heads and widths
    seq, capacity, g = args.text + args.vision, args.text + args.vision + args.decode_steps + 1, \
        torch.Generator().manual_seed(1)
    state = DecodeState([torch.randn(capacity, 1, *k.shape[2:], generator=g) for k in keys],
                        [torch.randn(capacity, 1, *v.shape[2:], generator=g) for v in values],
                        [torch.arange(capacity)[None] < seq for _ in keys], [seq] * len(keys), torch.tensor([seq]))
    states = {k: copy.deepcopy(state) for k in steps}
    embeds = [torch.randn(1, 1, loaded.config.hidden_size, generator=g) for _ in range(args.decode_steps + 1)]
    times = {k: [] for k in steps}
    with torch.no_grad():
        first = {k: decode_step(fn, states[k], embeds[0]) for k, fn in steps.items()}  # also the warm-up
        for i, x in enumerate(embeds[1:]):
            for k in (list(steps) if i % 2 == 0 else list(steps)[::-1]):  # alternate the order
                t = time.perf_counter()
                decode_step(steps[k], states[k], x)
                times[k].append(time.perf_counter() - t)
    return {"cache_tokens": seq, "steps": args.decode_steps,
            "ms_per_step": {k: statistics.median(ts) * 1e3 for k, ts in times.items()},
            "all_ms": {k: [t * 1e3 for t in ts] for k, ts in times.items()},
            "max_abs_logit_diff": (first["onnxruntime"] - first["export"]).abs().max().item()}


if __name__ == "__main__":
    main()
