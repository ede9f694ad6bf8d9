"""CUDA preflight without a GPU: trace the real-size backbones for `cuda` in bf16 on fake tensors.

    python benchmarks/cuda_preflight.py                       # both 30B shapes, all 48 layers
    python benchmarks/cuda_preflight.py --layers 16 --json out.json

A GPU loan is 15 minutes and may come once; the first one was lost to an export failure that the CPU
shows too. This check runs here what the GPU check's first minutes run there: the preset's real
shapes (InternVL3.5-30B-A3B's and Qwen3-VL-30B-A3B's language backbones: hidden 2048, 32 query / 4
KV heads, 128 experts top-8) get parameters that are FakeTensors on `cuda:0` in bf16 (no memory, no
driver), then torch.export of the prefill backbone with its KV cache, the FastMMoE passes (Top-Kv +
the authors' three merge stages at keep ratio 0.5), and the decode-step export. Every value of the
three programs must live on cuda:0 (a tensor the traced code makes on the CPU would be a device
mismatch on the GPU) and the weights must be bf16; the time of each step is printed.

Needs a CUDA build of torch (its CUDA code is never run, but the CPU-only wheel cannot make a `cuda`
fake tensor from `arange` and friends: "PyTorch is not linked with support for cuda devices"), so
.ci/run runs it in the torch 2.11 and 2.14 environments, whose registry builds are CUDA builds.
Exit 0: every preset passed; 1: a check failed (listed); 2: this torch cannot run the check.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PRESETS = ("internvl3.5-30b-a3b", "qwen3-vl-30b-a3b")
KEEP_RATIO = 0.5  # FastMMoE-50: the authors' InternVL3.5 schedule (config_preset), merges at 5, 8, 12


def log(msg: str) -> None:
    print(f"[cuda_preflight] {msg}", file=sys.stderr, flush=True)


def can_run() -> str | None:
    """None where this torch can make fake `cuda` tensors, else why not."""
    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is a CPU-only build: fake cuda tensors need a CUDA build "
                "(pip install torch==2.11.0 takes one; no GPU or driver is used)")
    return None


def build(preset: str, layers: int | None):
    """The preset on the meta device (real-size shapes, no weights), `layers` decoder layers."""
    from fastmmoe_compile.models.presets import PRESETS as ALL

    p = ALL[preset]

    def make_config():
        config = p.make_config()
        text = getattr(config, "text_config", None) or getattr(config, "language_config", None) or config
        if layers is not None:
            text.num_hidden_layers = layers
        return config

    return dataclasses.replace(p, make_config=make_config).build(torch.bfloat16)


def fake_on(module: torch.nn.Module, mode, device: str, dtype: torch.dtype) -> int:
    """Replace every parameter and buffer of `module` by a FakeTensor of `mode` on `device` (floating
    parameters in `dtype`; buffers keep theirs, as from_pretrained(dtype=...) leaves rotary tables).
    Returns the parameter count. Values are garbage: only shapes, dtypes and devices are traced."""
    count = 0
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                with mode:
                    t = torch.empty(p.shape, dtype=dtype if p.is_floating_point() else p.dtype, device=device)
                m._parameters[name] = torch.nn.Parameter(t, requires_grad=False)
                count += p.numel()
        for name, b in list(m._buffers.items()):
            if b is not None:
                with mode:
                    m._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)
    return count


def program_report(program, device: torch.device, dtype: torch.dtype) -> dict:
    """Devices and dtypes of every tensor value in `program`, and the problems: a value on another
    device, a weight not in `dtype`."""
    devices, dtypes, problems = {}, {}, []
    for node in program.graph.nodes:
        val = node.meta.get("val")
        for t in (val if isinstance(val, (tuple, list)) else (val,)):
            if not isinstance(t, torch.Tensor):
                continue
            devices[str(t.device)] = devices.get(str(t.device), 0) + 1
            dtypes[str(t.dtype)] = dtypes.get(str(t.dtype), 0) + 1
            if t.device != device and len(problems) < 10:
                problems.append(f"{node.name} ({node.target}) is on {t.device}")
    sdpa = set()  # what decides SDPA's CUDA kernel: heads of q and k, head dim, dtype, mask dtype, enable_gqa
    for node in program.graph.nodes:
        if node.target == torch.ops.aten.scaled_dot_product_attention.default:
            q, k = node.args[0].meta["val"], node.args[1].meta["val"]
            mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
            sdpa.add((f"q heads {q.shape[1]}", f"k heads {k.shape[1]}", f"head dim {q.shape[-1]}", str(q.dtype),
                      f"mask {mask.meta['val'].dtype if isinstance(mask, torch.fx.Node) else None}",
                      f"enable_gqa {node.kwargs.get('enable_gqa', False)}"))
    weights = program.graph_signature.inputs_to_parameters
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in weights and node.meta["val"].is_floating_point() \
                and node.meta["val"].dtype != dtype and len(problems) < 20:
            problems.append(f"weight {weights[node.name]} is {node.meta['val'].dtype}, not {dtype}")
    return {"nodes": len(program.graph.nodes), "devices": devices, "dtypes": dtypes, "problems": problems,
            "sdpa": sorted(", ".join(x) for x in sdpa)}


def preflight(preset: str, layers: int | None = None, device: str = "cuda") -> dict:
    """Export + passes + decode export of `preset` for `device` in bf16 on fake tensors.
    Returns {"preset", "layers", "seconds": {step: s}, "programs": {name: program_report}, "ok"}."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from fastmmoe_compile.config import config_preset
    from fastmmoe_compile.export import export_backbone
    from fastmmoe_compile.export.decode import export_decode
    from fastmmoe_compile.methods import apply_passes

    seconds, programs = {}, {}
    t = time.perf_counter()
    loaded = build(preset, layers)
    num_layers = loaded.family.num_layers(loaded.config)
    mode = FakeTensorMode(shape_env=ShapeEnv())
    params = fake_on(loaded.lm, mode, device, torch.bfloat16)
    seconds["build"] = time.perf_counter() - t
    log(f"{preset}: {num_layers} layers, {params / 1e9:.1f}B backbone parameters as fake {device} bf16 "
        f"in {seconds['build']:.1f}s")
    config = config_preset("internvl3.5-30b-a3b", keep_ratio=KEEP_RATIO)
    config.check_model(num_layers, loaded.family.top_k(loaded.config))
    target = torch.device(device, 0) if device == "cuda" else torch.device(device)
    def timed(step, fn):
        t = time.perf_counter()
        out = fn()
        seconds[step] = time.perf_counter() - t
        log(f"{preset}: {step} in {seconds[step]:.1f}s")
        return out

    with mode:  # example inputs are made in the parameters' fake mode (export takes them as they are)
        prefill = timed("export", lambda: export_backbone(loaded, cache=True))
    # The passes propagate in the program's own fake mode, so outside the parameters' one.
    programs["prefill (FastMMoE-50)"], record = timed("passes", lambda: apply_passes(prefill, config))
    with mode:
        programs["decode"] = timed("export decode", lambda: export_decode(loaded))
    reports = {name: program_report(p, target, torch.bfloat16) for name, p in programs.items()}
    merges = [c for r in record.passes if r["pass"] == "routing_merge" for c in r["changes"]]
    ok = not any(r["problems"] for r in reports.values()) and len(merges) == len(config.merge_layers)
    return {"preset": preset, "layers": num_layers, "device": device, "torch": torch.__version__,
            "merge_stages": len(merges), "seconds": seconds, "programs": reports, "ok": ok}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=",".join(PRESETS), help=f"comma list (default {','.join(PRESETS)})")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers (default: the model's 48; >= 13 for the merge at layer 12)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    why = can_run()
    if why:
        print(f"cuda_preflight: error: {why}", file=sys.stderr)
        return 2
    results, failed = [], []
    for preset in [x for x in args.presets.split(",") if x]:
        try:
            results.append(preflight(preset, args.layers))
        except Exception as e:  # noqa: BLE001 - one line per preset, the next one still runs
            results.append({"preset": preset, "ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"})
        r = results[-1]
        if not r["ok"]:
            failed.append(preset)
        problems = [x for rep in r.get("programs", {}).values() for x in rep["problems"]]
        log(f"{preset}: {'ok' if r['ok'] else 'FAILED'}"
            + (f" ({r['error']})" if "error" in r else "")
            + (f"; problems: {problems}" if problems else "")
            + (f"; steps: " + ", ".join(f"{k} {v:.1f}s" for k, v in r["seconds"].items()) if "seconds" in r else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps([{**{k: v for k, v in r.items() if k != "programs"},
                       "sdpa": {n: p["sdpa"] for n, p in r.get("programs", {}).items()}} for r in results], indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
