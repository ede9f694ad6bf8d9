"""The one command that verifies the GPU path on a short loan of one H100/H200 (<= 8 min wall,
no network, the torch it finds there: 2.11 on the loans so far):

    python benchmarks/gpu_check.py                 # on the GPU machine
    python benchmarks/gpu_check.py --dry-run       # anywhere: tiny shapes on the CPU, same code path (CI runs it)

Parts, each run on its own (an exception is recorded with its one-line cause and the next part runs;
gpu_check.json and gpu_check.md are rewritten after every part and every variant, so whatever ran
before a timeout or a crash is on disk):
1. pytest: `pytest -m gpu` (the GPU tests; skipped in a dry run).
2. backbone: the InternVL3.5-30B-A3B backbone shape (preset internvl3.5-30b-a3b-backbone, all 48
   layers), random bf16 weights made on the GPU, one image of 3328 vision + 64 text tokens. The
   backbone is exported ONCE and each variant's passes run on a copy of that graph (api.rewrite_each):
   transformers' own model, our unmodified program, Top-Kv, FastMMoE 50 % (the authors' setting,
   config_preset; --variants adds fastmmoe-75/25) and FastV 50 %, timed interleaved: medians, speedup,
   FLOPs ratio (flops.py), efficiency, achieved TFLOP/s against a bf16 matmul timed in the same run;
   decode ms/step; peak GPU memory and KV-cache bytes after prefill. Programs run eagerly (exported
   graph); --compile adds torch.compile.
3. vlm: each tiny VLM preset compiled for the device (fp32, so that tokens can match exactly): its
   greedy answer to an image + prompt equals the CPU engine's. The first preset is an AOTInductor
   engine, the others exported programs.
4. aoti: the engines users deploy: the unmodified and FastMMoE-50 engines as AOTInductor packages
   compiled for the device (compile_model(..., backend="inductor")), prefill and decode ms/step,
   against transformers' own model, in the same run, at --aoti-layers layers (default 16: the
   authors' merge layers 5, 8, 12 fit; a 48-layer AOTInductor compile does not fit a loan) - the
   output says how many layers it measured. Last: its compile is the
   longest, and each engine is timed as soon as it is built. The dry run's FastMMoE engine merges
   at one layer (three stages compile too, in 1-3 minutes on the CPU: too long for CI's three dry runs).
A dry run does the same on a 4-layer tiny-qwen3-moe (merge layers 1, 2, 3; its AOTInductor engines: 3
layers, one merge at layer 1) in bf16 on the CPU, and
tiny-internvl. Parts that do not fit --budget-s are skipped and listed as skipped, never as passing.
Every export and every step prints its seconds.

transformers: the package pins >= 5.23; a machine with an older one (5.17 on the loans seen so
far) runs this with the pure-Python transformers wheel carried beside it (README, "GPU check").
"""
from __future__ import annotations

import argparse
import dataclasses
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


PARTS = ("pytest", "backbone", "vlm", "aoti")  # aoti last: its compile is the longest
ALL_VARIANTS = ("unmodified", "topkv", "fastmmoe-75", "fastmmoe-50", "fastmmoe-25", "fastv-50")
DEFAULT_VARIANTS = "unmodified,topkv,fastmmoe-50,fastv-50"  # fits the loan; --variants adds fastmmoe-75/25


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (VLMs fp32, backbone bf16): the same code path")
    p.add_argument("--out-dir", default=None, help="default benchmarks/results/gpu_check[_dry]")
    p.add_argument("--vision", type=int, default=None, help="vision tokens (default 3328; dry run 24)")
    p.add_argument("--text", type=int, default=None, help="text tokens (default 64; dry run 16)")
    p.add_argument("--layers", type=int, default=None, help="backbone layers (default all 48; dry run 4)")
    p.add_argument("--aoti-layers", type=int, default=None,
                   help="layers of the AOTInductor engines (default 16; dry run 3); >= 13 keeps the authors' "
                        "merge layers 5, 8, 12, fewer merge at 1, 2, 3")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd variants (minutes of compile)")
    p.add_argument("--vlms", default=None, help=f"comma list of tiny VLM presets (default all: {','.join(TINY_VLMS)}; "
                                                "dry run tiny-internvl)")
    p.add_argument("--variants", default=None,
                   help=f"comma list of {', '.join(ALL_VARIANTS)} (default {DEFAULT_VARIANTS}; dry run "
                        "unmodified,fastmmoe-50,fastv-50); the unmodified one always runs")
    p.add_argument("--skip", default="", help=f"comma list of parts to skip: {', '.join(PARTS)}")
    p.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget; later parts are skipped past it")
    p.add_argument("--plan", action="store_true",
                   help="no GPU needed: time the backbone part's CPU-bound steps at the real shape on the meta device "
                        "(one export with the KV cache, each variant's passes, the decode export) and exit")
    p.add_argument("--fail-part", default=None, choices=PARTS,
                   help="raise inside this part (tests that a failing part leaves the others' results on disk)")
    args = p.parse_args(argv)
    dry = args.dry_run
    args.vision = args.vision or (24 if dry else 3328)
    args.text = args.text or (16 if dry else 64)
    args.layers = args.layers or (4 if dry else None)
    args.aoti_layers = args.aoti_layers or (3 if dry else 16)  # dry: 3 layers still show a merge's KV saving
    args.vlms = [v for v in (args.vlms or ("tiny-internvl" if dry else ",".join(TINY_VLMS))).split(",") if v]
    args.skip = {s for s in args.skip.split(",") if s}
    unknown = args.skip - set(PARTS)
    if unknown:
        p.error(f"--skip: unknown parts {sorted(unknown)}; the parts are {', '.join(PARTS)}")
    wanted = (args.variants or ("unmodified,fastmmoe-50,fastv-50" if dry else DEFAULT_VARIANTS)).split(",")
    args.variants = {"unmodified", *(v for v in wanted if v)}
    unknown = args.variants - set(ALL_VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; known: {', '.join(ALL_VARIANTS)}")
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


def merge_layers_for(num_layers: int) -> dict:
    """The authors' InternVL3.5 merge layers (5, 8, 12) where the model has them, else 1, 2, 3."""
    return {} if num_layers > 12 else {"merge_layers": (1, 2, 3)}


def variant_configs(num_layers: int, wanted) -> dict:
    """Unmodified, Top-Kv, FastMMoE 75/50/25 % (the authors' InternVL3.5 settings), FastV 50 %: those in
    `wanted`, in that order."""
    from fastmmoe_compile.config import FastMMoEConfig, FastVConfig, config_preset

    over = merge_layers_for(num_layers)
    configs = {"unmodified": FastMMoEConfig(vision_expert_ratio=1.0),
               "topkv": FastMMoEConfig(reduce_from_layer=2, vision_expert_ratio=0.5)}
    for r in (0.75, 0.5, 0.25):
        configs[f"fastmmoe-{round(r * 100)}"] = config_preset("internvl3.5-30b-a3b", keep_ratio=r, **over)
    configs["fastv-50"] = FastVConfig(prune_layer=2, keep_ratio=0.5)
    return {k: c for k, c in configs.items() if k in wanted}


def kv_bytes(out) -> int:
    """Bytes of the KV cache a prefill returned (every output after logits and kept positions)."""
    return sum(t.numel() * t.element_size() for t in out[2:])


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


def free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prefill_inputs(loaded, args, device, dtype):
    seq, prefix = args.text + args.vision, 8
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(1, seq, loaded.config.hidden_size, generator=gen).to(device, dtype),
            torch.arange(prefix, prefix + args.vision)[None].to(device))


def measure(args, fns: dict, engines: dict, inputs, device, weights: int, seq: int) -> tuple[dict, dict, dict, dict]:
    """Warm-up with peak memory and KV-cache bytes per variant, interleaved prefill times, decode
    ms/step (engines: {key: Engine} whose decode program decodes the variant's prefill output;
    ("transformers", ...) keys decode with transformers' own cache)."""
    from fastmmoe_compile.bench import decode_rep, engine_decoder, hf_decoder, interleaved, timer

    cuda = device.type == "cuda"
    timed = timer(device)
    memory, outs = {}, {}
    with torch.no_grad():
        for key, fn in fns.items():
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
    starts = {k: engine_decoder(engines[k], outs[k], seq, args.decode_steps) for k in fns if k in engines}
    for k in fns:
        if k[0] == "transformers" and args.decode_steps:
            starts[k] = hf_decoder(engines["transformers"], inputs[0], args.decode_steps)
    decode_rep(starts, args.decode_steps, timed, 0)  # warm-up
    decode = {k: [] for k in starts}
    for r in range(max(1, args.reps // 2)):
        for k, ts in decode_rep(starts, args.decode_steps, timed, r)[0].items():
            decode[k] += ts
    return times, decode, memory, outs


def rows_of(times, decode, memory, reports, peak, base_key) -> list[dict]:
    rows = []
    base = statistics.median(times[base_key])
    hf = statistics.median(times[("transformers", "unmodified")])
    for (lowering, name), ts in times.items():
        med = statistics.median(ts)
        own_base = statistics.median(times.get((lowering, "unmodified"), times[base_key])) \
            if lowering != "transformers" else base
        ratio = reports["unmodified"].total / reports[name].total
        row = {"lowering": lowering, "variant": name, "median_ms": med * 1e3, "speedup": own_base / med,
               "flops": reports[name].total, "flops_ratio": ratio, "efficiency": own_base / med / ratio,
               "tflops": reports[name].total / med / 1e12, "matmul_share": reports[name].total / med / 1e12 / peak,
               "speedup_vs_transformers": hf / med, **memory[(lowering, name)]}
        if decode.get((lowering, name)):
            row["decode_ms_per_step"] = statistics.median(decode[(lowering, name)]) * 1e3
        rows.append(row)
    return rows


def sdpa_kernels(config, seq: int, device: torch.device, dtype: torch.dtype) -> dict:
    """The SDPA kernel torch picks (torch._fused_sdp_choice) for the prefill's attention at this shape:
    as the engine runs it (K/V heads repeated, boolean causal mask [B, 1, S, S]), and the two forms
    it does not use (SDPA's own GQA with the mask; GQA without a mask, is_causal). "MATH" is the
    unfused fallback."""
    from torch.nn.attention import SDPBackend

    names = {int(b): n for n, b in SDPBackend.__members__.items()}
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    q = torch.zeros(1, heads, seq, dim, device=device, dtype=dtype)
    k = torch.zeros(1, kv_heads, seq, dim, device=device, dtype=dtype)
    mask = torch.ones(1, 1, seq, seq, device=device, dtype=torch.bool).tril()
    expanded = k.repeat_interleave(heads // kv_heads, 1)
    return {"engine (repeated K/V, bool mask)": names[torch._fused_sdp_choice(q, expanded, expanded, mask)],
            "enable_gqa, bool mask": names[torch._fused_sdp_choice(q, k, k, mask, enable_gqa=True)],
            "enable_gqa, is_causal": names[torch._fused_sdp_choice(q, k, k, None, is_causal=True, enable_gqa=True)]}


def build_backbone(args, layers: int | None, device: torch.device, dtype: torch.dtype, out: dict):
    """The backbone under test (the 30B shape; a dry run's tiny one) with random weights made on `device`,
    its facts into `out`: (LoadedModel, layer count, bytes of GPU memory its weights take)."""
    from fastmmoe_compile.bench import build_preset
    from fastmmoe_compile.models.presets import PRESETS

    preset = PRESETS["tiny-qwen3-moe" if args.dry_run else "internvl3.5-30b-a3b-backbone"]
    t0 = time.perf_counter()
    loaded = build_preset(preset, dtype, layers, device)
    num_layers = loaded.family.num_layers(loaded.config)
    out.update({"model": loaded.describe(), "layers": num_layers, "vision": args.vision, "text": args.text,
                "dtype": str(dtype).replace("torch.", ""), "seconds": {"build": time.perf_counter() - t0}})
    return loaded, num_layers, torch.cuda.memory_allocated() if device.type == "cuda" else 0


def check_backbone(args, device: torch.device, dtype: torch.dtype, out: dict, save) -> None:
    """Part 2, its results into `out` as they come (save() after each step)."""
    from fastmmoe_compile import flops
    from fastmmoe_compile.api import engine_in_process, rewrite_each
    from fastmmoe_compile.bench import compile_variant, hf_prefill

    cuda = device.type == "cuda"
    loaded, num_layers, weights = build_backbone(args, args.layers, device, dtype, out)
    out.update({"weights_bytes": weights if cuda else None, "rewrite_s": {}})
    log(f"built {loaded.source}: {num_layers} layers, {dtype}, {device} in {out['seconds']['build']:.0f}s")
    out["sdpa_kernel"] = sdpa_kernels(loaded.config, args.text + args.vision, device, dtype)
    log(f"SDPA kernel at this shape: {out['sdpa_kernel']}")
    save()
    configs = variant_configs(num_layers, args.variants)

    def done(name, secs):
        out["rewrite_s"][name] = secs
        log(f"{name}: passes in {secs:.1f}s")
        save()

    t = time.perf_counter()
    _, rewritten = rewrite_each(loaded, configs, cache=True, quiet=False, on_done=done)  # one export
    out["seconds"]["export_and_passes"] = time.perf_counter() - t
    inputs = prefill_inputs(loaded, args, device, dtype)
    t = time.perf_counter()
    engine = engine_in_process(loaded, *rewritten["unmodified"], configs["unmodified"], quiet=False)  # + decode export
    out["seconds"]["decode_export"] = time.perf_counter() - t
    save()
    fns, engines = {}, {"transformers": loaded}
    for name, (program, _) in rewritten.items():
        fns[("eager", name)] = engine.backbone if name == "unmodified" else program.module()
        engines[("eager", name)] = engine
        if args.compile:
            t = time.perf_counter()
            fns[("compiled", name)] = compile_variant(program, inputs)
            engines[("compiled", name)] = engine
            out["seconds"][f"torch.compile {name}"] = time.perf_counter() - t
    fns[("transformers", "unmodified")] = hf_prefill(loaded)
    seq = inputs[0].shape[1]
    times, decode, memory, _ = measure(args, fns, engines, inputs, device, weights, seq)
    peak = matmul_tflops(device, dtype, 8192 if cuda else 512)
    reports = {name: flops.analytic_flops(loaded, None if name == "unmodified" else cfg, args.text, args.vision)
               for name, cfg in configs.items()}
    out.update({"matmul_tflops": peak, "matmul_n": 8192 if cuda else 512,
                "rows": rows_of(times, decode, memory, reports, peak, ("eager", "unmodified"))})
    out["targets"] = targets(out["rows"])
    save()


def check_aoti(args, device: torch.device, dtype: torch.dtype, tmp: Path, out: dict, save) -> None:
    """Part 3: the unmodified and FastMMoE-50 engines as AOTInductor packages for `device`, written,
    loaded and timed (prefill, decode ms/step) against transformers' own model, at args.aoti_layers."""
    from fastmmoe_compile import flops
    from fastmmoe_compile.api import compile_model
    from fastmmoe_compile.bench import hf_prefill

    cuda = device.type == "cuda"
    loaded, num_layers, weights = build_backbone(args, args.aoti_layers, device, dtype, out)
    out.update({"note": f"AOTInductor engines of {num_layers} of the model's layers (a full-depth compile does not "
                        "fit a loan)" if not args.dry_run else "dry run: tiny model on the CPU"})
    save()
    configs = variant_configs(num_layers, {"unmodified", "fastmmoe-50"})
    if args.dry_run:
        # One merge stage: the dry run checks the code path (three stages compile in 1-3 minutes on the CPU,
        # too long for CI's three dry runs); the GPU run keeps the authors' three stages. At layer 1, before
        # the last layer's attention, so the KV cache is smaller than the unmodified engine's (merged after
        # the last layer, every layer's cache keeps full length).
        configs["fastmmoe-50"] = dataclasses.replace(configs["fastmmoe-50"], merge_layers=(1,), stage_ratios=None)
    out["merge_layers"] = list(configs["fastmmoe-50"].merge_layers)
    peak = matmul_tflops(device, dtype, 8192 if cuda else 512)
    out.update({"matmul_tflops": peak, "matmul_n": 8192 if cuda else 512})
    inputs = prefill_inputs(loaded, args, device, dtype)
    fns, engines = {("transformers", "unmodified"): hf_prefill(loaded)}, {"transformers": loaded}
    reports = {}
    for name, config in configs.items():
        t = time.perf_counter()
        engine = compile_model(loaded, config, out=tmp / f"aoti-{name}", backend="inductor", device=device.type,
                               overwrite=True)
        out["seconds"][f"compile {name}"] = time.perf_counter() - t
        log(f"aoti {name}: compiled, written and loaded in {out['seconds'][f'compile {name}']:.0f}s")
        fns[("aoti", name)] = engine.backbone
        engines[("aoti", name)] = engine
        reports[name] = flops.analytic_flops(loaded, None if name == "unmodified" else config, args.text, args.vision)
        # Timed as soon as it exists (against the engines before it): the unmodified engine's numbers
        # are on disk even if the FastMMoE engine's compile outlasts the loan.
        times, decode, memory, _ = measure(args, fns, engines, inputs, device, weights, inputs[0].shape[1])
        out["rows"] = rows_of(times, decode, memory, reports, peak, ("aoti", "unmodified"))
        save()


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


def table(b: dict, title: str) -> list[str]:
    """Whatever `b` holds so far (a part that failed early has only some of it)."""
    if "model" in b:
        source = b["model"]["source"]
        source += "" if "layers)" in source else f" ({b['layers']} layers)"
        lines = [f"{title}: {source}, {b['vision']} vision + {b['text']} text "
                 f"tokens, {b['dtype']}" + (f"; {b['dtype']} matmul {b['matmul_n']}^3: {b['matmul_tflops']:.1f} "
                                            "TFLOP/s" if "matmul_tflops" in b else ""), ""]
    else:
        lines = [f"{title}: (partial)", ""]
    if b.get("note"):
        lines += [b["note"], ""]
    if b.get("sdpa_kernel"):
        lines += ["SDPA kernel: " + ", ".join(f"{k}: {v}" for k, v in b["sdpa_kernel"].items()), ""]
    seconds = [f"{k} {v:.1f}" for k, v in b.get("seconds", {}).items()]
    seconds += [f"passes {k} {v:.1f}" for k, v in b.get("rewrite_s", {}).items()]
    if seconds:
        lines += ["Seconds: " + ", ".join(seconds), ""]
    if not b.get("rows"):
        return lines
    lines += ["| lowering | variant | median ms | speedup | FLOPs ratio | efficiency | TFLOP/s | % of matmul | "
              "vs transformers | decode ms/step | peak GiB | KV cache MiB |", "|---" * 12 + "|"]
    for r in b["rows"]:
        gib = "" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2 ** 30:.1f}"
        kv = "" if r["kv_cache_bytes"] is None else f"{r['kv_cache_bytes'] / 2 ** 20:.1f}"
        dec = f"{r['decode_ms_per_step']:.2f}" if "decode_ms_per_step" in r else ""
        lines.append(f"| {r['lowering']} | {r['variant']} | {r['median_ms']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['flops_ratio']:.2f}x | {r['efficiency']:.2f} | {r['tflops']:.1f} | "
                     f"{r['matmul_share'] * 100:.0f}% | {r['speedup_vs_transformers']:.2f}x | {dec} | {gib} | {kv} |")
    if b.get("targets"):
        lines += ["", "Targets: " + json.dumps(b["targets"])]
    return lines + [""]


def markdown(result: dict) -> str:
    lines = [f"# GPU check ({'dry run, ' if result['dry_run'] else ''}{result['environment'].get('gpu', 'cpu')})", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in result["environment"].items()), "",
             "| part | status | seconds | cause |", "|---|---|---|---|"]
    lines += [f"| {name} | {p['status']} | {p.get('seconds', 0):.0f} | {p.get('error', '')} |"
              for name, p in result["parts"].items()]
    lines.append("")
    if "pytest" in result:
        lines += [f"pytest -m gpu: {result['pytest'].get('summary')} (rc {result['pytest'].get('returncode')})", ""]
    if result.get("backbone"):
        lines += table(result["backbone"], "Backbone (exported programs)")
    if result.get("aoti"):
        lines += table(result["aoti"], "AOTInductor engines")
    if result.get("vlm"):
        lines += ["| tiny VLM | backend | dtype | manifest device | same greedy tokens as CPU |", "|---|---|---|---|---|"]
        lines += [f"| {v['preset']} | {v['backend']} | {v['dtype']} | {v['manifest_device']} | {v['same_tokens']} |"
                  for v in result["vlm"]]
        lines.append("")
    if result["skipped"]:
        lines += ["Skipped (not verified): " + ", ".join(result["skipped"])]
    return "\n".join(lines) + "\n"


def time_plan(args) -> dict:
    """--plan: the backbone part's tracing steps (single-core Python, as fast on a GPU machine as its
    CPU is) at the real shape and layer count, with fake bf16 weights (cuda_preflight.fake_on: no
    memory): one export with the KV cache, each variant's passes on a copy, the decode export.
    Returns {"layers", "torch", "seconds": {step: s}}."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    import importlib.util

    spec = importlib.util.spec_from_file_location("cuda_preflight", ROOT / "benchmarks" / "cuda_preflight.py")
    preflight = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(preflight)  # the sibling script: its fake-weights helpers
    build, fake_on = preflight.build, preflight.fake_on
    from fastmmoe_compile.export import export_backbone
    from fastmmoe_compile.export.decode import export_decode
    from fastmmoe_compile.methods import apply_passes
    from fastmmoe_compile.torch_compat import copy_program

    seconds = {}
    t = time.perf_counter()
    loaded = build("internvl3.5-30b-a3b", args.layers)  # the 30B backbone shape, on meta
    mode = FakeTensorMode(shape_env=ShapeEnv())
    fake_on(loaded.lm, mode, "cpu", torch.bfloat16)
    seconds["build (fake weights)"] = time.perf_counter() - t
    num_layers = loaded.family.num_layers(loaded.config)
    configs = variant_configs(num_layers, args.variants)
    log(f"plan: {num_layers} layers, fake bf16 weights, variants {list(configs)}")
    for config in configs.values():
        config.check_model(num_layers, loaded.family.top_k(loaded.config))
    t = time.perf_counter()
    with mode:  # example inputs in the weights' fake mode
        exported = export_backbone(loaded, cache=True)
    seconds["export"] = time.perf_counter() - t
    log(f"plan: export in {seconds['export']:.1f}s")
    for name, config in configs.items():  # what api.rewrite_each does after its one export (timed apart)
        t = time.perf_counter()
        apply_passes(copy_program(exported), config)
        seconds[f"passes {name}"] = time.perf_counter() - t
        log(f"plan: passes {name} in {seconds[f'passes {name}']:.1f}s")
    t = time.perf_counter()
    with mode:
        export_decode(loaded)
    seconds["export decode"] = time.perf_counter() - t
    log(f"plan: export decode in {seconds['export decode']:.1f}s")
    seconds["total"] = sum(seconds.values())
    return {"layers": num_layers, "torch": torch.__version__, "variants": list(configs), "seconds": seconds}


# Seconds a part needs at least to be started on a GPU (the rest of the budget goes to later parts).
MIN_SECONDS = {"pytest": 0, "backbone": 150, "aoti": 120, "vlm": 30}


def main(argv=None) -> int:
    import tempfile
    import traceback

    args = parse_args(argv)
    start = time.perf_counter()
    if args.plan:
        plan = time_plan(args)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "gpu_check_plan.json").write_text(json.dumps(plan, indent=2))
        print(json.dumps(plan, indent=2))
        return 0
    cuda = not args.dry_run
    if cuda and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA GPU here (torch.cuda.is_available() is False): run it on a GPU machine, "
              "or pass --dry-run", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    result = {"dry_run": args.dry_run, "environment": environment(device), "parts": {}, "skipped": [],
              "args": {k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
                       for k, v in vars(args).items()}}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    left = lambda: args.budget_s - (time.perf_counter() - start)  # noqa: E731

    def save() -> None:
        """Rewrite both files (atomically: a kill mid-write leaves the previous ones)."""
        result["total_s"] = time.perf_counter() - start
        for name, text in (("gpu_check.json", json.dumps(result, indent=2, default=str)),
                           ("gpu_check.md", markdown(result))):
            tmp = args.out_dir / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, args.out_dir / name)

    def pytest_part(tmp):
        result["pytest"] = run_pytest()
        log(f"pytest: {result['pytest']['summary']}")
        if not result["pytest"]["passed"]:
            raise RuntimeError(f"pytest -m gpu: {result['pytest']['summary']}")

    def backbone_part(tmp):
        result["backbone"] = {}
        check_backbone(args, device, torch.bfloat16, result["backbone"], save)  # the GPU's dtype (CPU: its twin)

    def aoti_part(tmp):
        result["aoti"] = {}
        check_aoti(args, device, torch.bfloat16, tmp, result["aoti"], save)

    def vlm_part(tmp):
        result["vlm"] = []
        for i, preset in enumerate(args.vlms):
            if cuda and left() < MIN_SECONDS["vlm"]:
                result["skipped"].append(f"vlm {preset}")
                continue
            backend = "inductor" if cuda and i == 0 else "export"
            log(f"{preset} ({backend}) ...")
            result["vlm"].append(check_vlm(preset, device.type, backend, torch.float32, tmp))
            log(f"{preset}: same tokens as cpu: {result['vlm'][-1]['same_tokens']}")
            save()
        if not all(v["same_tokens"] for v in result["vlm"]):
            raise AssertionError("a device engine's greedy answer differs from the CPU engine's")

    parts = {"pytest": pytest_part, "backbone": backbone_part, "vlm": vlm_part, "aoti": aoti_part}
    save()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for name, run in parts.items():
            if name in args.skip or (name == "pytest" and args.dry_run):
                result["skipped"].append("pytest -m gpu" if name == "pytest" else name)
                result["parts"][name] = {"status": "skipped"}
            elif cuda and left() < MIN_SECONDS[name]:
                result["skipped"].append(f"{name} (budget)")
                result["parts"][name] = {"status": "skipped (budget)"}
            else:
                log(f"part {name} ...")
                t = time.perf_counter()
                result["parts"][name] = {"status": "running"}
                save()
                try:
                    if args.fail_part == name:
                        raise RuntimeError(f"--fail-part {name}: a deliberate failure")
                    run(Path(tmp))
                    result["parts"][name] = {"status": "passed", "seconds": time.perf_counter() - t}
                except Exception as e:  # noqa: BLE001 - recorded, and the next part runs
                    traceback.print_exc()
                    result["parts"][name] = {"status": "failed", "seconds": time.perf_counter() - t,
                                             "error": one_line(e)}
                log(f"part {name}: {result['parts'][name]['status']} in {time.perf_counter() - t:.0f}s"
                    + (f" ({result['parts'][name]['error']})" if "error" in result["parts"][name] else ""))
                free_memory()
            save()
    print(markdown(result))
    failed = [n for n, p in result["parts"].items() if p["status"] == "failed"]
    log(f"done in {time.perf_counter() - start:.0f}s; results in {args.out_dir}"
        + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
