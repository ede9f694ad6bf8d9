"""Prefill latency and decode tokens/s of FastMMoE (Top-Kv + routing-aware merging), Top-Kv
alone and FastV, against the unmodified backbone and transformers' own model, in one run
(batch 1). `fastmmoe-compile bench` and benchmarks/bench_prefill.py are thin entries to main().

The model comes from the package's own loader (models.load_model, or Preset.build with a layer
count or a device). The unmodified model runs as `api.compile_model(model, out=None)` builds it,
one engine per lowering; every other variant is rewritten from the same loaded model (same weights)
with `api.rewrite`. All run on the same inputs and are timed in interleaved repetitions (the order
rotates every repetition, so noise from other processes hits every variant alike); we report
medians and ratios. Two lowerings: the ExportedProgram run eagerly (ep.module(), what the `export`
backend runs) and torch.compile (lower.compile_in_process, the in-process `inductor` backend);
speedups are against the unmodified program of the same lowering. FLOPs come from flops.py
(analytic, docs/fastmmoe.md section 4), efficiency = speedup / FLOPs ratio. The merge share is the
part of one eager prefill (torch.profiler) spent in the token-reduction machinery:
fastmmoe::merge_tokens + fastmmoe::last_token_attention + fastmmoe::gather_tokens + the router
chain the pass clones onto the pre-merge stream (wrapped in a profiler range).

Decode: after each variant's prefill, --decode-steps greedy steps through the unmodified engine's
decode path (Engine.start_decode / Engine.decode, what generate runs: the one-token step program,
eager or torch.compile'd like the prefill, over that variant's per-layer caches, shorter after merges);
the transformers row decodes with HF's DynamicCache (passed back each step, cropped back to the
prompt between repetitions). Median ms per step and tokens/s (batch 1).

--device cuda builds the real-size presets (internvl3.5-30b-a3b-backbone, deepseek-vl2-small-
backbone) with random bf16 weights directly on the GPU (no download) and times with
torch.cuda.synchronize around every call.

    fastmmoe-compile bench --threads 1 --layers 4 --vision 512 --reps 2         # CPU, minutes
    fastmmoe-compile bench --threads 1                                          # the issue's CPU setting (~20 min)
    fastmmoe-compile bench --device cuda --preset internvl3.5-30b-a3b-backbone  # GPU (untested here)
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

from .errors import UserInputError

GROUPS = ("unmodified", "topkv", "fastmmoe", "fastv", "sparsevlm")
KEEP_RATIOS = "0.75,0.5,0.25"
MERGE_OPS = ("fastmmoe::merge_tokens", "fastmmoe::last_token_attention", "fastmmoe::gather_tokens",
             "fastmmoe::sparsevlm_raters", "fastmmoe::rater_attention", "fastmmoe::sparsevlm_tokens")
CLONE_RANGE = "fastmmoe::router_clone"
SDPA_CPU = "aten::_scaled_dot_product_flash_attention_for_cpu"
# Real-size backbones for --device cuda, and the authors' merge settings that go with each.
GPU_PRESETS = {"internvl3.5-30b-a3b-backbone": "internvl3.5-30b-a3b",
               "deepseek-vl2-small-backbone": "deepseek-vl2-small"}


def parse_args(argv=None, prog=None):
    """The bench's arguments, checked and with their defaults filled in."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return finish_args(p.parse_args(argv))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bench's flags, on its own parser or on the `fastmmoe-compile bench` subparser."""
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: real-size presets with random bf16 weights made on the GPU")
    p.add_argument("--preset", default=None,
                   help="model preset (default: bench-qwen3-moe on cpu, internvl3.5-30b-a3b-backbone on cuda; "
                        f"cuda presets: {', '.join(GPU_PRESETS)})")
    p.add_argument("--config-preset", default=None,
                   help="the authors' merge settings for the FastMMoE variants (config.config_preset; default: "
                        "internvl3.5-30b-a3b, or the one matching a cuda preset)")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (quick runs, GPU memory)")
    p.add_argument("--vision", type=int, default=None,
                   help="vision tokens, one image (default 1024 on cpu; 1792 on cuda: InternVL3.5's 6+1 tiles x 256)")
    p.add_argument("--text", type=int, default=64, help="text tokens")
    p.add_argument("--prefix", type=int, default=8, help="text tokens before the image")
    p.add_argument("--keep-ratios", default=KEEP_RATIOS, help="vision-token retentions of fastmmoe/fastv/sparsevlm")
    p.add_argument("--fastv-layer", type=int, default=None, help="the layer FastV prunes at (default 2)")
    p.add_argument("--variants", default=",".join(GROUPS),
                   help=f"comma list of groups ({', '.join(GROUPS)}) or variant names such as fastmmoe-50; "
                        "unmodified is always run (the baseline)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of every variant (the first checks outputs)")
    p.add_argument("--decode-steps", type=int, default=None,
                   help="greedy decode steps timed per variant and rep (default 16; 0: no decode)")
    p.add_argument("--no-decode", action="store_true", help="prefill only (no cache outputs, no decode timing)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-compile", action="store_true", help="eager ExportedProgram only")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler merge-share runs (cpu only)")
    p.add_argument("--profile-rows", type=int, default=0, help="also print a profiler op table of this many rows")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers row (the model as users run it today)")
    p.add_argument("--out-dir", default=None,
                   help="results dir: results.json, table.md and PNG plots (plots need matplotlib); "
                        "default benchmarks/results/bench_<device>")


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Check the parsed flags (BenchError) and fill in the defaults that depend on --device."""
    _check_args(args)
    cuda = args.device == "cuda"
    args.preset = args.preset or ("internvl3.5-30b-a3b-backbone" if cuda else "bench-qwen3-moe")
    args.config_preset = args.config_preset or GPU_PRESETS.get(args.preset, "internvl3.5-30b-a3b")
    args.vision = args.vision if args.vision is not None else (1792 if cuda else 1024)
    args.fastv_layer = 2 if args.fastv_layer is None else args.fastv_layer
    args.decode_steps = 16 if args.decode_steps is None else args.decode_steps
    args.out_dir = args.out_dir if args.out_dir is not None else f"benchmarks/results/bench_{args.device}"
    if cuda:
        args.no_profile = True  # the merge share reads CPU op times: meaningless for GPU kernels
    return args


class BenchError(UserInputError):
    """Bad benchmark input (unknown preset or variant, no CUDA): one line, exit code 2 from the CLI."""


def _check_args(args) -> None:
    """Numbers in range, and no flag given that this run would ignore (None: not given)."""
    for flag, least in (("vision", 1), ("text", 1), ("prefix", 0), ("reps", 1), ("warmup", 1), ("decode_steps", 0),
                        ("threads", 1), ("layers", 1), ("profile_rows", 0), ("fastv_layer", 0)):
        value = getattr(args, flag)
        if value is not None and value < least:
            raise BenchError(f"--{flag.replace('_', '-')} must be >= {least}, got {value}")
    if args.prefix > args.text:
        raise BenchError(f"--prefix {args.prefix} must be at most --text {args.text}: the prefix is part of the text")
    try:
        ratios = [float(r) for r in args.keep_ratios.split(",") if r.strip()]
    except ValueError:
        ratios = []
    if not ratios or not all(0 < r <= 1 for r in ratios):
        raise BenchError(f"--keep-ratios must be comma-separated numbers in (0, 1], got {args.keep_ratios!r}")
    wanted = {w.strip() for w in args.variants.split(",")}
    runs = {g for g in ("fastmmoe", "fastv", "sparsevlm") if g in wanted or any(w.startswith(g + "-") for w in wanted)}
    if args.decode_steps is not None and args.no_decode:
        raise BenchError("--decode-steps and --no-decode: pass one of them (--decode-steps 0 also skips decode)")
    if args.profile_rows and (args.no_profile or args.device == "cuda"):
        raise BenchError("--profile-rows needs the CPU profile: not with --no-profile or --device cuda")
    if args.fastv_layer is not None and "fastv" not in runs:
        raise BenchError("--fastv-layer needs fastv variants (--variants)")
    if args.config_preset is not None and "fastmmoe" not in runs:
        raise BenchError("--config-preset needs fastmmoe variants (--variants)")
    if args.keep_ratios != KEEP_RATIOS and not runs:
        raise BenchError("--keep-ratios needs fastmmoe, fastv or sparsevlm variants (--variants)")


def device_of(args) -> torch.device:
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise BenchError(f"--device cuda needs a CUDA GPU and a CUDA build of torch; this torch is "
                             f"{torch.__version__} and torch.cuda.is_available() is False")
        return torch.device("cuda")
    return torch.device("cpu")


def build(preset: str, layers: int | None, device: torch.device):
    """The preset's model, built by the package (models.load_model / Preset.build): fp32 on cpu;
    on cuda random bf16 weights made directly on the GPU. `layers` overrides num_hidden_layers."""
    from fastmmoe_compile.models import FAMILIES, load_model
    from fastmmoe_compile.models.presets import PRESETS

    p = PRESETS.get(preset)
    if p is None or p.model_type not in FAMILIES:
        text_presets = [n for n, q in PRESETS.items() if q.model_type in FAMILIES]
        raise BenchError(f"unknown or non-backbone preset {preset!r}; the bench runs a language backbone: "
                         f"{', '.join(text_presets)}")
    if p.on_meta and device.type != "cuda":
        raise BenchError(f"{preset} is real-size: it runs with --device cuda (random bf16 weights on the GPU)")
    if device.type == "cpu" and layers is None:
        return load_model(preset)
    return build_preset(p, torch.bfloat16 if device.type == "cuda" else torch.float32, layers, device)


def build_preset(p, dtype: torch.dtype, layers: int | None, device: torch.device):
    """Preset.build with num_hidden_layers = `layers` and random weights made on `device` (real-size
    presets included). Preset.build(dtype, num_layers=, device=) where models/presets.py has them;
    until then the same Preset.build, on a copy of the preset whose config has the layer count and
    that is built like a random one, under `device` as torch's default device."""
    import dataclasses
    import inspect

    if "num_layers" in inspect.signature(p.build).parameters:
        return p.build(dtype, num_layers=layers, device=device)

    def make_config():
        config = p.make_config()
        if layers is not None:
            config.num_hidden_layers = layers
        return config

    name = p.name if layers is None else f"{p.name} ({layers} layers)"
    kind = "benchmark random" if p.on_meta else p.kind
    with torch.device(device):
        return dataclasses.replace(p, name=name, kind=kind, make_config=make_config).build(dtype)


def variant_configs(args, num_layers: int) -> dict:
    from fastmmoe_compile.config import FastMMoEConfig, FastVConfig, SparseVLMConfig, config_preset

    ratios = [float(r) for r in args.keep_ratios.split(",") if r]
    allv = {"unmodified": ("unmodified", FastMMoEConfig(vision_expert_ratio=1.0)),  # Kv == K: graph untouched
            "topkv": ("topkv", FastMMoEConfig(reduce_from_layer=2, vision_expert_ratio=0.5))}
    for r in ratios:
        tag = f"{round(r * 100):d}"
        cfg = config_preset(args.config_preset, keep_ratio=r)
        if max(cfg.merge_layers) < num_layers:
            allv[f"fastmmoe-{tag}"] = ("fastmmoe", cfg)
        elif tag == f"{round(ratios[0] * 100):d}":
            print(f"[bench] no fastmmoe variants: {args.config_preset} merges at layers {list(cfg.merge_layers)}, "
                  f"the model has {num_layers} (pick more --layers or another --config-preset)", file=sys.stderr)
        allv[f"fastv-{tag}"] = ("fastv", FastVConfig(prune_layer=args.fastv_layer, keep_ratio=r))
        allv[f"sparsevlm-{tag}"] = ("sparsevlm", SparseVLMConfig.for_model(num_layers, keep_ratio=r))
    wanted = {w.strip() for w in args.variants.split(",") if w.strip()} | {"unmodified"}
    unknown = wanted - set(allv) - set(GROUPS)
    if unknown:
        raise BenchError(f"unknown variants {sorted(unknown)}; known: {', '.join(GROUPS)}, {', '.join(allv)}")
    return {name: cfg for name, (group, cfg) in allv.items() if name in wanted or group in wanted}


def timer(device: torch.device):
    """seconds of fn(*args): on cuda with a synchronize before and after (kernels run async)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn, *args):
        sync()
        t = time.perf_counter()
        out = fn(*args)
        sync()
        return time.perf_counter() - t, out

    return timed


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
    """lower.compile_in_process (what compile_model(out=None) lowers with), compiled here by its first
    call (Inductor compiles lazily)."""
    from fastmmoe_compile.lower import compile_in_process

    fn = compile_in_process(program)
    with torch.no_grad():
        fn(*inputs)
    return fn


# --- decode ---------------------------------------------------------------------------------

def unmodified_engine(loaded, config, lowering: str, decode: bool):
    """The unmodified model as `compile_model(..., out=None)` builds it in this process (eager
    ExportedProgram or torch.compile): its backbone is the unmodified variant's prefill and its
    decode path (Engine.start_decode / Engine.decode, what generate runs) decodes every variant:
    decode tokens are text tokens, which no pass changes."""
    from fastmmoe_compile.api import compile_model

    backend = "inductor" if lowering == "compiled" else "export"
    return compile_model(loaded, config, out=None, backend=backend, quiet=True, decode=decode)


def engine_decoder(engine, prefill_out, seq: int, steps: int):
    """start() -> step(timed) -> (seconds, token): greedy decode from a variant's prefill output,
    a fresh state at every start."""
    from fastmmoe_compile.runtime.engine import PrefillResult

    logits, kept, *cache = prefill_out
    result = PrefillResult(logits, kept, [(cache[i], cache[i + 1]) for i in range(0, len(cache), 2)], seq)

    def start():
        state, token = engine.start_decode(result, steps), logits.argmax(-1)

        def step(timed):
            nonlocal token
            dt, out = timed(engine.decode, state, token[:, None])
            token = out.argmax(-1)
            return dt, int(token[0])

        return step

    return start


def hf_decoder(loaded, embeds: torch.Tensor, steps: int):
    """transformers' decode as users run it: one prefill into a DynamicCache, then one-token
    forwards with the cache; the cache is cropped back to the prompt before every run."""
    from .transformers_compat import cache_kwargs, output_cache

    with torch.no_grad():
        out = loaded.lm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
    cache, first, seq = output_cache(out), out.logits[:, -1], embeds.shape[1]

    def one(token):
        with torch.no_grad():
            return loaded.lm(input_ids=token[:, None], use_cache=True, logits_to_keep=1,
                             **cache_kwargs(loaded.lm, cache)).logits[:, -1]

    def start():
        if cache.get_seq_length() > seq:
            cache.crop(seq - cache.get_seq_length())  # transformers 5: a negative count removes tokens
        token = first.argmax(-1)

        def step(timed):
            nonlocal token
            dt, logits = timed(one, token)
            token = logits.argmax(-1)
            return dt, int(token[0])

        return step

    return start


def decode_rep(starts: dict, steps: int, timed, rotation: int) -> tuple[dict, dict]:
    """One rep of every decoder, interleaved step by step (the order rotates every step), so
    that a burst of noise from other processes hits every variant alike: (seconds, tokens)."""
    runs = {k: start() for k, start in starts.items()}
    keys, times, tokens = list(starts), {k: [] for k in starts}, {k: [] for k in starts}
    for s in range(steps):
        r = (rotation + s) % len(keys)
        for k in keys[r:] + keys[:r]:
            dt, token = runs[k](timed)
            times[k].append(dt)
            tokens[k].append(token)
    return times, tokens


# --- main ---------------------------------------------------------------------------------

def main(argv=None, prog=None) -> dict:
    return run(parse_args(argv, prog))


def run(args: argparse.Namespace) -> dict:
    """The benchmark of parse_args' (or finish_args') arguments: prints the table, returns the results."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = device_of(args)
    from fastmmoe_compile import flops
    from fastmmoe_compile.api import rewrite
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
    for name, cfg in configs.items():
        if name == "unmodified" and args.no_profile:
            continue  # its program is only needed for the profile; the engines run it
        t = time.perf_counter()
        _, programs[name], _ = rewrite(loaded, cfg, cache=decode)
        setup[name] = {"rewrite_s": time.perf_counter() - t}
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


def time_prefill(fns: dict, inputs: tuple, reps: int, log, timed=None) -> dict:
    """{key: [seconds of fns[key](*inputs) per rep]}, interleaved (timed: timer(device), default CPU)."""
    timed = timed or timer(torch.device("cpu"))
    return interleaved({k: (lambda fn=fn: timed(fn, *inputs)[0]) for k, fn in fns.items()}, reps, log, "prefill")


def interleaved(calls: dict, reps: int, log, what: str) -> dict:
    """{key: [result of calls[key]() per rep]}, the order rotated every rep."""
    results = {k: [] for k in calls}
    keys = list(calls)
    for r in range(reps):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            results[k].append(calls[k]())
        log(f"[bench] {what} rep {r + 1}/{reps}: " + ", ".join(
            f"{k[0][0]}/{k[1]} {_ms(results[k][-1]):.0f}" for k in keys))
    return results


def _ms(x) -> float:
    return (statistics.median(x) if isinstance(x, list) else x) * 1e3


def result_rows(args, configs, reports, times, decode_times, shares, num_layers) -> list[dict]:
    from fastmmoe_compile import flops

    def base_of(lowering, measured):
        # Against the unmodified program of the same lowering; the transformers row is compared
        # with the compiled unmodified backbone (the reference), eager without compile.
        if lowering != "transformers":
            return (lowering, "unmodified")
        return ("compiled" if ("compiled", "unmodified") in measured else "eager", "unmodified")

    base_flops = reports["unmodified"].total
    rows = []
    for (lowering, name), ts in times.items():
        base_key = base_of(lowering, times)
        med, base = statistics.median(ts), statistics.median(times[base_key])
        fr = base_flops / reports[name].total
        row = {"lowering": lowering, "variant": name, "config": configs[name].to_dict(),
               "median_ms": med * 1e3, "min_ms": min(ts) * 1e3, "all_ms": [t * 1e3 for t in ts],
               "speedup": base / med, "speedup_min": min(times[base_key]) / min(ts),
               "flops": reports[name].total, "flops_ratio": fr, "efficiency": base / med / fr,
               "vision_after": flops.vision_schedule(None if name == "unmodified" else configs[name],
                                                     num_layers, args.vision)[-1][1],
               "merge_share": shares[name]["share"] if name in shares and lowering == "eager"
               and name not in ("unmodified", "topkv") else None}
        if (lowering, name) in decode_times:
            step = statistics.median(decode_times[(lowering, name)])
            base_step = statistics.median(decode_times[base_of(lowering, decode_times)])
            row.update({"decode_ms_per_step": step * 1e3, "decode_tokens_per_s": 1 / step,
                        "decode_speedup": base_step / step, "decode_steps": len(decode_times[(lowering, name)])})
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], decode: bool) -> str:
    head = "| lowering | variant | vision kept | median ms | speedup | FLOPs ratio | efficiency | merge share |"
    if decode:
        head += " decode ms/step | decode tok/s | decode vs unmodified |"
    table = [head, "|---" * head.count(" | ") + "|---|"]
    for r in rows:
        share = "" if r["merge_share"] is None else f"{r['merge_share'] * 100:.2f}%"
        line = (f"| {r['lowering']} | {r['variant']} | {r['vision_after']} | {r['median_ms']:.0f} | "
                f"{r['speedup']:.2f}x | {r['flops_ratio']:.2f}x | {r['efficiency']:.2f} | {share} |")
        if decode:
            line += (f" {r['decode_ms_per_step']:.1f} | {r['decode_tokens_per_s']:.1f} | {r['decode_speedup']:.2f}x |"
                     if "decode_ms_per_step" in r else "  |  |  |")
        table.append(line)
    return "\n".join(table)


def print_profile(shares: dict, reports: dict) -> None:
    if not shares:
        return
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


def hf_prefill(loaded):
    """The transformers model's forward on the whole prompt (its default experts implementation)."""
    def run(embeds, positions):
        logits = loaded.lm(inputs_embeds=embeds, use_cache=False, logits_to_keep=1).logits[:, -1]
        return logits, torch.arange(embeds.shape[1], device=embeds.device)[None]
    return run


PLOTS = [("median_ms", "prefill latency (ms, median)", "latency_vs_retention.png"),
         ("flops", "prefill FLOPs (G)", "flops_vs_retention.png"),
         ("decode_tokens_per_s", "decode tokens/s (batch 1, median step)", "decode_vs_retention.png")]


def write_results(out: Path, result: dict, log) -> None:
    """results.json, table.md and, with matplotlib, latency / FLOPs / decode tokens/s against
    retention (one line per method)."""
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
    for key, ylabel, fname in PLOTS:
        if not any(key in r for r in result["rows"]):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for lowering in sorted({r["lowering"] for r in result["rows"]} - {"transformers"}):
            by_method: dict[str, list] = {}
            for r in result["rows"]:
                if r["lowering"] != lowering or key not in r:
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
