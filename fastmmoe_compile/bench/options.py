"""The bench's command line: arguments, their checks and defaults, BenchError."""
from __future__ import annotations

import argparse

import torch

from ..errors import UserInputError


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
    from . import __doc__ as description  # the package's: what the bench measures

    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
