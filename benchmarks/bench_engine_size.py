"""Engine directory size and compile time against the checkpoint's size (issue 13, weights stored once).

    PYTHONPATH=. python benchmarks/bench_engine_size.py --preset tiny-qwen3-moe --backend inductor export onnx
    PYTHONPATH=. python benchmarks/bench_engine_size.py --preset bench-qwen3-moe --layers 3 --dtype bfloat16

Saves the preset with save_pretrained (the checkpoint a user would have), compiles it with each
backend (decode included) through the CLI's code path, and prints per backend: compile seconds
(wall, one run), the engine dir's bytes, each file's bytes, and the ratio to the checkpoint's
weight bytes (*.safetensors of the checkpoint dir). JSON with --json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-qwen3-moe")
    parser.add_argument("--backend", nargs="+", default=["inductor", "export"])
    parser.add_argument("--layers", type=int, help="cut the preset to this many layers")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)

    import torch

    from fastmmoe_compile import compile_model
    from fastmmoe_compile.bench import build_preset
    from fastmmoe_compile.models.presets import PRESETS

    results = {"preset": args.preset, "layers": args.layers, "dtype": args.dtype, "backends": {}}
    with tempfile.TemporaryDirectory(prefix="fastmmoe-size-") as tmp:
        checkpoint = Path(tmp) / "checkpoint"
        model = build_preset(PRESETS[args.preset], getattr(torch, args.dtype), args.layers, torch.device("cpu"))
        model.lm.save_pretrained(checkpoint)
        del model
        weights = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
        results["checkpoint_weight_bytes"] = weights
        print(f"{args.preset}: checkpoint weights {weights} bytes")
        for backend in args.backend:
            out = Path(tmp) / backend
            start = time.perf_counter()
            compile_model(str(checkpoint), out=out, backend=backend, quiet=True)
            seconds = time.perf_counter() - start
            files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
            total = dir_bytes(out)
            results["backends"][backend] = {"compile_s": round(seconds, 1), "dir_bytes": total,
                                            "ratio_to_checkpoint": round(total / weights, 2), "files": files}
            print(f"{backend}: compile {seconds:.1f} s, engine dir {total} bytes = {total / weights:.2f}x the "
                  f"checkpoint's weights; files {files}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
