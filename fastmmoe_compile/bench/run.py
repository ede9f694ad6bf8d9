"""One benchmark run: build, rewrite, lower, time, report."""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from .options import device_of, parse_args
from .profile import merge_share, print_profile
from .report import markdown_table, result_rows, write_results
from .timing import _ms, decode_rep, engine_decoder, hf_decoder, time_prefill, timer
from .variants import build, compile_variant, hf_prefill, unmodified_engine, variant_configs


def main(argv=None, prog=None) -> dict:
    return run(parse_args(argv, prog))


def run(args: argparse.Namespace) -> dict:
    """The benchmark of parse_args' (or finish_args') arguments: prints the table, returns the results."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = device_of(args)
    from fastmmoe_compile import flops
    from fastmmoe_compile.api import rewrite_each
    from fastmmoe_compile.config import SparseVLMConfig

    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    timed = timer(device)
    t_start = time.perf_counter()
    loaded = build(args.preset, args.layers, device)
    num_layers = loaded.family.num_layers(loaded.config)
    dtype = next(loaded.lm.parameters()).dtype
    log(f"[bench] built {loaded.source} ({dtype}, {device}) in {time.perf_counter() - t_start:.0f}s")
    configs = variant_configs(args, num_layers)
    decode = not args.no_decode and args.decode_steps > 0

    seq = args.text + args.vision
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, seq, loaded.config.hidden_size, generator=gen).to(device, dtype),
              torch.arange(args.prefix, args.prefix + args.vision)[None].to(device))

    lowerings = ["eager"] + ([] if args.no_compile else ["compiled"])
    programs, fns, setup, engines = {}, {}, {}, {}
    for lowering in lowerings:  # the unmodified model as compile_model builds it: prefill and decode
        t = time.perf_counter()
        engines[lowering] = unmodified_engine(loaded, configs["unmodified"], lowering, decode)
        fns[(lowering, "unmodified")] = engines[lowering].backbone
        if lowering == "compiled":
            with torch.no_grad():
                engines[lowering].backbone(*inputs)  # Inductor compiles at the first call
        setup[f"engine_{lowering}"] = {"compile_model_s": time.perf_counter() - t}
        log(f"[bench] unmodified {lowering} engine (compile_model): {time.perf_counter() - t:.0f}s")
    # One export for every variant, each variant's passes on a copy of it (api.rewrite_each). The unmodified
    # program is only needed for the profile; the engines run it.
    wanted = {name: cfg for name, cfg in configs.items() if not (name == "unmodified" and args.no_profile)}
    t = time.perf_counter()
    passes_s = {}
    _, rewritten = rewrite_each(loaded, wanted, cache=decode, on_done=passes_s.__setitem__)
    setup["export"] = {"export_s": time.perf_counter() - t - sum(passes_s.values())}
    log(f"[bench] one export for {len(wanted)} variants: {setup['export']['export_s']:.0f}s")
    for name in wanted:
        programs[name] = rewritten[name][0]
        setup[name] = {"passes_s": passes_s[name]}
        if name != "unmodified":
            fns[("eager", name)] = programs[name].module()
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
                checks[f"{lowering}/{name}"] = {
                    "max_abs_logit_diff_vs_eager": (logits.float() - ref_logits.float()).abs().max().item(),
                    "same_kept_tokens": bool(torch.equal(kept, ref_kept))}
        times = time_prefill(fns, inputs, args.reps, log, timed)

    decode_times, decode_tokens = {}, {}
    if decode:
        starts = {(lowering, name): engine_decoder(engines[lowering], out[(lowering, name)], seq, args.decode_steps)
                  for lowering, name in out if lowering in engines}
        if not args.no_hf:
            starts[("transformers", "unmodified")] = hf_decoder(loaded, inputs[0], args.decode_steps)
        t = time.perf_counter()  # warm-up: torch.compile compiles (and recompiles per cache layout) here
        decode_tokens = decode_rep(starts, args.decode_steps, timed, 0)[1]
        log(f"[bench] decode warm-up {time.perf_counter() - t:.0f}s")
        decode_times = {k: [] for k in starts}
        for r in range(args.reps):
            rep_times, rep_tokens = decode_rep(starts, args.decode_steps, timed, r)
            assert rep_tokens == decode_tokens, "greedy decode changed between repetitions"
            for k, ts in rep_times.items():
                decode_times[k] += ts
            log(f"[bench] decode rep {r + 1}/{args.reps} (ms/step): " + ", ".join(
                f"{k[0][0]}/{k[1]} {_ms(ts):.0f}" for k, ts in rep_times.items()))
        ref = decode_tokens.get(("eager", "unmodified"))
        checks["decode_tokens"] = {f"{lo}/{n}": {"same_tokens_as_eager_unmodified": tokens == ref}
                                   for (lo, n), tokens in decode_tokens.items()}

    shares = {}
    if not args.no_profile:
        for name in configs:  # one profiled eager prefill each (the baselines for the time breakdown)
            shares[name] = merge_share(programs[name], inputs, args.profile_rows)
            log(f"[bench] profile {name}: merge share {shares[name]['share'] * 100:.2f}%")

    rows = result_rows(args, configs, reports, times, decode_times, shares, num_layers)
    table = markdown_table(rows, decode)
    print(f"\n{loaded.source}: batch 1, {args.text} text + {args.vision} vision tokens, {dtype}, {device}, "
          f"{torch.get_num_threads()} threads, {args.reps} reps (medians), "
          f"merge settings of {args.config_preset}, FastV at layer {args.fastv_layer}, SparseVLM at layers "
          f"{list(SparseVLMConfig.for_model(num_layers).prune_layers)}"
          + (f", decode {args.decode_steps} greedy steps per rep" if decode else "") + "\n")
    print(table)
    print("\nFLOPs (G): " + ", ".join(f"{n} {reports[n].total / 1e9:.1f}" for n in configs))
    print_profile(shares, reports)
    prefill_checks = {n: c for n, c in checks.items() if n != "decode_tokens"}
    if prefill_checks:
        print("\nvs the eager program (max |logit diff|): " + ", ".join(
            f"{n} {c['max_abs_logit_diff_vs_eager']:.1e}{'' if c['same_kept_tokens'] else ' (kept tokens differ!)'}"
            for n, c in prefill_checks.items()))
    if decode_tokens:
        same = [n for n, c in checks["decode_tokens"].items() if c["same_tokens_as_eager_unmodified"]]
        print(f"\ngreedy decode tokens equal to eager/unmodified's: {', '.join(same) or 'none'}")
    log(f"[bench] total {time.perf_counter() - t_start:.0f}s")

    result = {
        "args": vars(args), "model": loaded.describe(), "threads": torch.get_num_threads(),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "device": str(device),
                    **({"gpu": torch.cuda.get_device_name()} if device.type == "cuda" else {})},
        "experts_implementation": getattr(loaded.lm.config, "_experts_implementation", None),
        "rows": rows, "setup_s": setup, "merge_share": {n: {k: v for k, v in s.items() if k != "table"}
                                                        for n, s in shares.items()},
        "flops": {n: r.to_dict() for n, r in reports.items()}, "checks": checks, "table": table,
        "decode_tokens": {f"{lo}/{n}": t for (lo, n), t in decode_tokens.items()},
        "total_s": time.perf_counter() - t_start,
    }
    if args.out_dir:
        write_results(Path(args.out_dir), result, log)
    return result
