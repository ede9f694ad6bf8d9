"""Prefill latency of FastMMoE (Top-Kv + routing-aware merging), Top-Kv alone and FastV,
against the unmodified exported backbone, in one run (CPU, fp32, batch 1).

Every variant is rewritten from one loaded model (same weights) with
`fastmmoe_compile.api.rewrite`, runs on the same inputs, and is timed in interleaved
repetitions (the order rotates every repetition, so noise from other processes hits every
variant alike); we report medians and ratios. Two lowerings: the ExportedProgram run
eagerly (ep.module()) and torch.compile (lower.inductor.compile_in_process); speedups are
against the unmodified program of the same lowering. FLOPs come from flops.py (analytic,
spec section 4), efficiency = speedup / FLOPs ratio. The merge share is the part of one
eager prefill (torch.profiler) spent in the token-reduction machinery:
fastmmoe::merge_tokens + fastmmoe::last_token_attention + fastmmoe::gather_tokens + the
router chain the pass clones onto the pre-merge stream (wrapped in a profiler range).

    python benchmarks/bench_prefill.py --threads 1                 # the issue's setting (~17 min, cold Inductor cache)
    python benchmarks/bench_prefill.py --threads 1 --layers 4 --vision 256 --reps 2 --no-compile
    python benchmarks/bench_prefill.py --variants unmodified,fastmmoe --keep-ratios 0.5 --no-compile
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

GROUPS = ("unmodified", "topkv", "fastmmoe", "fastv")
MERGE_OPS = ("fastmmoe::merge_tokens", "fastmmoe::last_token_attention", "fastmmoe::gather_tokens")
CLONE_RANGE = "fastmmoe::router_clone"
SDPA_CPU = "aten::_scaled_dot_product_flash_attention_for_cpu"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench-qwen3-moe")
    p.add_argument("--config-preset", default="internvl3.5-30b-a3b",
                   help="the authors' merge settings for the FastMMoE variants (config.config_preset)")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (quick runs)")
    p.add_argument("--vision", type=int, default=1024, help="vision tokens (one image)")
    p.add_argument("--text", type=int, default=64, help="text tokens")
    p.add_argument("--prefix", type=int, default=8, help="text tokens before the image")
    p.add_argument("--keep-ratios", default="0.75,0.5,0.25", help="vision-token retentions of fastmmoe/fastv")
    p.add_argument("--fastv-layer", type=int, default=2)
    p.add_argument("--variants", default=",".join(GROUPS),
                   help=f"comma list of groups ({', '.join(GROUPS)}) or variant names such as fastmmoe-50; "
                        "unmodified is always run (the baseline)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of every variant (the first checks outputs)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-compile", action="store_true", help="eager ExportedProgram only")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler merge-share runs")
    p.add_argument("--profile-rows", type=int, default=0, help="also print a profiler op table of this many rows")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers row (the model as users run it today)")
    p.add_argument("--out-dir", default="benchmarks/results/prefill_cpu",
                   help="results dir: results.json, table.md and PNG plots (plots need matplotlib)")
    return p.parse_args(argv)


def build(preset: str, layers: int | None):
    from fastmmoe_compile.models import load_model
    from fastmmoe_compile.models.presets import PRESETS
    from fastmmoe_compile.models.registry import FAMILIES, LoadedModel

    if layers is None:
        return load_model(preset)
    from transformers import AutoModelForCausalLM

    p = PRESETS[preset]
    config = p.make_config()
    config.num_hidden_layers = layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)
        lm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return LoadedModel(lm.eval(), FAMILIES[p.model_type], f"{preset} ({layers} layers)")


def variant_configs(args, num_layers: int) -> dict:
    from fastmmoe_compile.config import FastMMoEConfig, FastVConfig, config_preset

    ratios = [float(r) for r in args.keep_ratios.split(",") if r]
    allv = {"unmodified": ("unmodified", FastMMoEConfig(vision_expert_ratio=1.0)),  # Kv == K: graph untouched
            "topkv": ("topkv", FastMMoEConfig(reduce_from_layer=2, vision_expert_ratio=0.5))}
    for r in ratios:
        tag = f"{round(r * 100):d}"
        cfg = config_preset(args.config_preset, keep_ratio=r)
        if max(cfg.merge_layers) < num_layers:
            allv[f"fastmmoe-{tag}"] = ("fastmmoe", cfg)
        allv[f"fastv-{tag}"] = ("fastv", FastVConfig(prune_layer=args.fastv_layer, keep_ratio=r))
    wanted = {w.strip() for w in args.variants.split(",") if w.strip()} | {"unmodified"}
    unknown = wanted - set(allv) - set(GROUPS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(GROUPS)}, {', '.join(allv)}")
    return {name: cfg for name, (group, cfg) in allv.items() if name in wanted or group in wanted}


# --- the merge share ---------------------------------------------------------------------

def _range_enter(name):
    rf = torch.autograd.profiler.record_function(name)
    rf.__enter__()
    return rf


def _range_exit(rf, *after):
    rf.__exit__(None, None, None)


def mark_router_clones(gm: torch.fx.GraphModule) -> int:
    """Wrap each cloned router chain (the nodes that compute merge_tokens' routing
    distributions from the pre-merge stream) in a profiler range; returns how many."""
    def ancestors(node):
        seen, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n not in seen:
                seen.add(n)
                stack.extend(n.all_input_nodes)
        return seen

    graph, wrapped = gm.graph, 0
    order = {n: i for i, n in enumerate(graph.nodes)}
    for merge in [n for n in graph.nodes if n.target == torch.ops.fastmmoe.merge_tokens.default]:
        residual, probs = merge.args[0], merge.args[1]
        if probs is None:
            continue  # FastV: no router
        chain = [n for n in ancestors(probs) - ancestors(residual) if n.op == "call_function"]
        if not chain:
            continue
        chain.sort(key=order.__getitem__)
        with graph.inserting_before(chain[0]):
            handle = graph.call_function(_range_enter, (CLONE_RANGE,))
        with graph.inserting_after(chain[-1]):
            graph.call_function(_range_exit, (handle, chain[-1]))
        wrapped += 1
    gm.recompile()
    return wrapped


def merge_share(program, inputs, rows: int = 0) -> dict:
    """One profiled eager prefill: time in the merge machinery / the whole prefill."""
    from torch.profiler import ProfilerActivity, profile

    gm = program.module()
    clones = mark_router_clones(gm)
    with torch.no_grad():
        gm(*inputs)  # warm (first-call allocations)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            gm(*inputs)
            wall = time.perf_counter() - t
    by_key = {e.key: e for e in prof.key_averages()}
    total_of = lambda k: by_key[k].cpu_time_total / 1e6 if k in by_key else 0.0  # noqa: E731
    parts = {k: total_of(k) for k in (*MERGE_OPS, CLONE_RANGE)}
    calls = {k: by_key[k].count if k in by_key else 0 for k in (*MERGE_OPS, CLONE_RANGE)}
    total = sum(parts.values())
    # Where the rest goes: expert GEMMs, attention kernel, the other matmuls, everything else.
    experts, attention = total_of("fastmmoe::grouped_mm"), total_of(SDPA_CPU)
    mm = by_key["aten::mm"].self_cpu_time_total / 1e6 if "aten::mm" in by_key else 0.0
    grouped_inner = by_key["aten::_grouped_mm"].cpu_time_total / 1e6 if "aten::_grouped_mm" in by_key else 0.0
    categories = {"expert_gemm": experts, "attention": attention, "dense_mm": max(0.0, mm - grouped_inner),
                  "merge": total}
    categories["other"] = max(0.0, wall - sum(categories.values()))
    out = {"wall_s": wall, "merge_s": total, "share": total / wall, "parts_s": parts, "calls": calls,
           "router_clones": clones, "categories_s": categories}
    if rows:
        out["table"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return out


def compile_variant(program, inputs):
    """lower.inductor.compile_in_process, compiled here by its first call (Inductor compiles lazily)."""
    from fastmmoe_compile.lower.inductor import compile_in_process

    fn = compile_in_process(program)
    with torch.no_grad():
        fn(*inputs)
    return fn


# --- main ---------------------------------------------------------------------------------

def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from fastmmoe_compile import flops
    from fastmmoe_compile.api import rewrite

    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    loaded = build(args.preset, args.layers)
    num_layers = loaded.family.num_layers(loaded.config)
    log(f"[bench] built {loaded.source} in {time.perf_counter() - t_start:.0f}s")
    configs = variant_configs(args, num_layers)

    seq = args.text + args.vision
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, seq, loaded.config.hidden_size, generator=gen),
              torch.arange(args.prefix, args.prefix + args.vision)[None])

    programs, fns, setup = {}, {}, {}
    for name, cfg in configs.items():
        t = time.perf_counter()
        _, programs[name], _ = rewrite(loaded, cfg)
        fns[("eager", name)] = programs[name].module()
        setup[name] = {"rewrite_s": time.perf_counter() - t}
        if not args.no_compile:
            t = time.perf_counter()
            fns[("compiled", name)] = compile_variant(programs[name], inputs)
            setup[name]["compile_s"] = time.perf_counter() - t
        log(f"[bench] {name}: " + ", ".join(f"{k} {v:.0f}s" for k, v in setup[name].items()))

    if not args.no_hf:  # transformers' model as users run it today: same weights, full prompt, no passes
        fns[("transformers", "unmodified")] = hf_prefill(loaded)

    reports = {name: flops.analytic_flops(loaded, None if name == "unmodified" else cfg, args.text, args.vision)
               for name, cfg in configs.items()}
    with torch.no_grad():
        out = {k: fn(*inputs) for k, fn in fns.items()}
        for _ in range(args.warmup - 1):
            for fn in fns.values():
                fn(*inputs)
        # Sanity: the kept sequence is the FLOPs schedule's; compiled agrees with eager.
        checks = {}
        for (lowering, name), result in out.items():
            logits, kept = result[0], result[1]
            sched_last = flops.vision_schedule(None if name == "unmodified" else configs[name], num_layers,
                                               args.vision)[-1][1]
            assert kept.shape[1] == args.text + sched_last, (name, lowering, kept.shape, sched_last)
            if lowering != "eager":
                ref_logits, ref_kept = out[("eager", name)][:2]
                checks[f"{lowering}/{name}"] = {"max_abs_logit_diff_vs_eager": (logits - ref_logits).abs().max().item(),
                                "same_kept_tokens": bool(torch.equal(kept, ref_kept))}
        times = {k: [] for k in fns}
        keys = list(fns)
        for r in range(args.reps):
            for k in keys[r % len(keys):] + keys[: r % len(keys)]:  # rotate the order
                t = time.perf_counter()
                fns[k](*inputs)
                times[k].append(time.perf_counter() - t)
            log(f"[bench] rep {r + 1}/{args.reps}: " + ", ".join(
                f"{k[0][0]}/{k[1]} {times[k][-1] * 1e3:.0f}" for k in keys))

    shares = {}
    if not args.no_profile:
        for name in configs:  # one profiled eager prefill each (the baselines for the time breakdown)
            shares[name] = merge_share(programs[name], inputs, args.profile_rows)
            log(f"[bench] profile {name}: merge share {shares[name]['share'] * 100:.2f}%")

    base_flops = reports["unmodified"].total
    rows = []
    for (lowering, name), ts in times.items():
        # Speedups are against the unmodified program of the same lowering; the transformers
        # row is compared with the compiled unmodified backbone (the reference).
        base_key = ("compiled" if ("compiled", "unmodified") in times else "eager", "unmodified") \
            if lowering == "transformers" else (lowering, "unmodified")
        med, base = statistics.median(ts), statistics.median(times[base_key])
        fr = base_flops / reports[name].total
        rows.append({"lowering": lowering, "variant": name, "config": configs[name].to_dict(),
                     "median_ms": med * 1e3, "min_ms": min(ts) * 1e3, "all_ms": [t * 1e3 for t in ts],
                     "speedup": base / med, "speedup_min": min(times[base_key]) / min(ts),
                     "flops": reports[name].total, "flops_ratio": fr, "efficiency": base / med / fr,
                     "vision_after": flops.vision_schedule(None if name == "unmodified" else configs[name],
                                                           num_layers, args.vision)[-1][1],
                     "merge_share": shares[name]["share"] if name in shares and lowering == "eager"
                     and name not in ("unmodified", "topkv") else None})

    table = ["| lowering | variant | vision kept | median ms | speedup | FLOPs ratio | efficiency | merge share |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = "" if r["merge_share"] is None else f"{r['merge_share'] * 100:.2f}%"
        table.append(f"| {r['lowering']} | {r['variant']} | {r['vision_after']} | {r['median_ms']:.0f} | "
                     f"{r['speedup']:.2f}x | {r['flops_ratio']:.2f}x | {r['efficiency']:.2f} | {share} |")
    print(f"\n{loaded.source}: batch 1, {args.text} text + {args.vision} vision tokens, fp32, "
          f"{torch.get_num_threads()} threads, {args.reps} reps (medians), "
          f"merge settings of {args.config_preset}, FastV at layer {args.fastv_layer}\n")
    print("\n".join(table))
    print("\nFLOPs (G): " + ", ".join(f"{n} {reports[n].total / 1e9:.1f}" for n in configs))
    if shares:
        reduced = {n: s for n, s in shares.items() if n not in ("unmodified", "topkv")}
        if reduced:
            print("\nMerge machinery (eager, torch.profiler, ms): " + "; ".join(
                f"{n}: " + ", ".join(f"{k.split('::')[1]} {v * 1e3:.1f}" for k, v in s["parts_s"].items())
                + f" of {s['wall_s'] * 1e3:.0f}" for n, s in reduced.items()))
        cats = list(next(iter(shares.values()))["categories_s"])
        print("\nProfiled eager prefill by part, ms (FLOPs share of the analytic count in brackets):\n")
        print("| variant | " + " | ".join(cats) + " | total |")
        print("|---" * (len(cats) + 2) + "|")
        for n, s in shares.items():
            bp = reports[n].by_part
            fl = {"expert_gemm": bp["routed"], "attention": bp["attn_core"],
                  "dense_mm": bp["attn_proj"] + bp["router"] + bp["dense"] + bp["lm_head"], "merge": bp["merge"]}
            tot = reports[n].total
            print(f"| {n} | " + " | ".join(
                f"{s['categories_s'][c] * 1e3:.0f}" + (f" ({fl[c] / tot * 100:.0f}%)" if c in fl else "")
                for c in cats) + f" | {s['wall_s'] * 1e3:.0f} |")
        for n, s in shares.items():
            if "table" in s:
                print(f"\n### profile: eager {n}\n\n{s['table']}")
    if checks:
        print("\nvs the eager program (max |logit diff|): " + ", ".join(
            f"{n} {c['max_abs_logit_diff_vs_eager']:.1e}{'' if c['same_kept_tokens'] else ' (kept tokens differ!)'}"
            for n, c in checks.items()))
    log(f"[bench] total {time.perf_counter() - t_start:.0f}s")

    result = {
        "args": vars(args), "model": loaded.describe(), "threads": torch.get_num_threads(),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__},
        "experts_implementation": getattr(loaded.lm.config, "_experts_implementation", None),
        "rows": rows, "setup_s": setup, "merge_share": {n: {k: v for k, v in s.items() if k != "table"}
                                                        for n, s in shares.items()},
        "flops": {n: r.to_dict() for n, r in reports.items()}, "checks": checks, "table": "\n".join(table),
        "total_s": time.perf_counter() - t_start,
    }
    if args.out_dir:
        write_results(Path(args.out_dir), result, log)
    return result


def hf_prefill(loaded):
    """The transformers model's forward on the whole prompt (its default experts implementation)."""
    def run(embeds, positions):
        logits = loaded.lm(inputs_embeds=embeds, use_cache=False, logits_to_keep=1).logits[:, -1]
        return logits, torch.arange(embeds.shape[1])[None]
    return run


def write_results(out: Path, result: dict, log) -> None:
    """results.json, table.md and, with matplotlib, latency/FLOPs against retention (one line per method)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "table.md").write_text(result["table"] + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("[bench] matplotlib not installed: no plots (pip install matplotlib)")
        return
    vision = result["args"]["vision"]
    for key, ylabel, fname in [("median_ms", "prefill latency (ms, median)", "latency_vs_retention.png"),
                               ("flops", "prefill FLOPs (G)", "flops_vs_retention.png")]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for lowering in sorted({r["lowering"] for r in result["rows"]} - {"transformers"}):
            by_method: dict[str, list] = {}
            for r in result["rows"]:
                if r["lowering"] != lowering:
                    continue
                method = r["variant"].split("-")[0]
                y = r[key] / (1e9 if key == "flops" else 1)
                by_method.setdefault(method, []).append((r["vision_after"] / vision * 100, y))
            for method, pts in by_method.items():
                pts.sort()
                style = "o-" if len(pts) > 1 else "s"
                ax.plot(*zip(*pts), style, label=f"{method} ({lowering})" if key != "flops" else method)
            if key == "flops":
                break  # FLOPs do not depend on the lowering
        ax.set_xlabel("vision tokens kept after the last stage (%)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
    log(f"[bench] wrote {out}/(results.json, table.md, *.png)")


if __name__ == "__main__":
    main()
