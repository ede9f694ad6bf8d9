"""fastmmoe-compile: the command line.

    fastmmoe-compile [compile] MODEL --out ENGINE [flags] compile MODEL into an engine directory
    fastmmoe-compile diff MODEL [config flags]            show what the passes change in the graph
    fastmmoe-compile flops MODEL [config flags]           FLOPs per layer, baseline vs FastMMoE (no weights needed)
    fastmmoe-compile presets                              list the built-in models
    fastmmoe-compile inspect ENGINE                       show an engine's manifest
    fastmmoe-compile run ENGINE --image F --prompt P      greedy answer of a VLM engine to images + a prompt
    fastmmoe-compile bench [--device cuda] [flags]        prefill latency and decode tokens/s, all methods side by side
    fastmmoe-compile serve ENGINE [--port 8000] [flags]   an OpenAI-compatible server (the serve extra)
    fastmmoe-compile env [--json]                         versions, CPU (bf16 speed), GPUs, backends: for bug reports

Every FastMMoEConfig field is a flag of the same name with dashes (--keep-ratio,
--merge-layers 5,8,12, ...). The commands are argparse subcommands; `compile` is implied when the
first word is not one (so `fastmmoe-compile MODEL --out DIR` is `fastmmoe-compile compile MODEL --out DIR`).

Exit code 2 with one line "fastmmoe-compile: error: ..." is for bad input only: a UserInputError
(fastmmoe_compile/errors.py: what a user typed or pointed at), a file-system error for a path, or
argparse's own complaint about the command line (the usage is printed on -h only). Anything else
is a bug and ends in a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import signal
import sys
import threading
import warnings

from .config import CONFIG_PRESETS, ConfigError
from .errors import UserInputError
from .lower.backends import backend_names
from .methods import METHODS, flag

SUBCOMMANDS = ("compile", "diff", "flops", "presets", "inspect", "run", "bench", "serve", "env")
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
_DEFAULT_METHOD = "fastmmoe"


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """--method, then each registered method's own flags (methods.Method.add_flags, add_flag_group)."""
    parser.add_argument("--method", choices=tuple(METHODS), default=_DEFAULT_METHOD,
                        help=", or ".join(method.help for method in METHODS.values()))
    for method in METHODS.values():
        method.add_flags(parser)
    for method in METHODS.values():
        method.add_flag_group(parser)


def _as_flags(message: str) -> str:
    """A config error names dataclass fields (keep_ratio=0); the user typed flags (--keep-ratio 0)."""
    flags = {method.field_of(dest): flag(dest) for method in METHODS.values() for dest in method.flags
             if method.field_of(dest) is not None}
    return re.sub(rf"(?<![\w-])({'|'.join(flags)})\b(=?)",
                  lambda m: flags[m.group(1)] + (" " if m.group(2) else ""), message)


def _config_from(args):
    """The configuration of --method from the flags typed. A flag of another method is an error:
    "needs --method X" where X owns it, else "--method M takes ... only" (the flags M reads)."""
    chosen = METHODS[args.method]
    typed = {dest: getattr(args, dest) for method in METHODS.values() for dest in method.flags
             if getattr(args, dest) is not None}
    takes = chosen.flags + chosen.shared_flags
    foreign = [dest for dest in typed if dest not in takes]
    for dest in foreign:
        owner = next(method for method in METHODS.values() if dest in method.flags)
        if owner.name != _DEFAULT_METHOD:
            raise ConfigError(f"{flag(dest)} needs --method {owner.name}")
    if foreign:
        names = [flag(dest) for dest in takes]
        listed = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        takes_what = f"takes {listed} only" if names else "takes no flags"
        raise ConfigError(f"--method {chosen.name} {takes_what}, not {', '.join(map(flag, foreign))}")
    return chosen.from_flags({dest: v for dest, v in typed.items() if dest in takes})


class CliError(UserInputError):
    """Bad command-line input that the CLI itself finds (an empty --prompt, a negative count)."""


def _dtype(name: str | None):
    import torch

    if name is None:
        return None
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class _UsageError(Exception):
    """argparse's complaint about the command line (a missing --out, --keep-ratio abc)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line and exit 2 like every other CLI error (main
    prints it): the full usage only on -h. Subparsers are of this class too (add_subparsers)."""

    help_command: str | None = None  # the -h that lists this parser's flags, where it is not `prog -h`

    def error(self, message: str):
        raise _UsageError(f"{message} ({self.help_command or self.prog + ' -h'} lists the flags)")


def _parser() -> argparse.ArgumentParser:
    """The command line: one subparser per command (`fastmmoe-compile -h` lists them)."""
    top = _Parser(
        prog="fastmmoe-compile",
        description="Compile a Hugging Face MoE model with FastMMoE (arXiv 2511.17885) into an engine directory, "
                    "and inspect, run and benchmark engines. `fastmmoe-compile MODEL --out DIR` is short for "
                    "`fastmmoe-compile compile MODEL --out DIR`.",
        epilog="fastmmoe-compile COMMAND -h: the flags of one command.",
    )
    from . import __version__

    top.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    p = sub.add_parser("compile", prog="fastmmoe-compile",  # the bare MODEL --out form reads as before
                       help="compile MODEL into an engine directory (the default command)",
                       description="Compile a Hugging Face MoE model with FastMMoE into an engine directory.")
    p.help_command = "fastmmoe-compile compile -h"
    p.add_argument("model", help="a local checkpoint dir, a hub id, or a preset (fastmmoe-compile presets)")
    p.add_argument("--out", required=True, help="engine directory to write (written atomically)")
    p.add_argument("--backend", choices=backend_names(), default="inductor",
                   help="inductor: AOTInductor package (default); export: the rewritten ExportedProgram, run eagerly; "
                        "onnx: an ONNX model run by ONNX Runtime (the onnx extra); tensorrt: not built yet")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the engine runs: cpu (default) or cuda (weights loaded straight to the GPU; "
                        "fails before any work without one)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help="weights dtype (default: bfloat16 on cuda; on cpu the checkpoint's, but float32 for a bf16 "
                        "checkpoint where this CPU has no native bf16 GEMMs (fastmmoe-compile env says), for "
                        "--backend onnx and for random presets)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing engine directory")
    p.add_argument("--no-decode", action="store_true",
                   help="prefill only: skip the decode program (faster compile; generate is then unavailable)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    _add_config_flags(p)

    p = sub.add_parser("diff", help="show what the passes change in the exported graph, per layer",
                       description="Print what the FastMMoE passes change in the exported graph, per layer.")
    p.add_argument("model", help="a local checkpoint dir, a hub id, or a preset")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None)
    _add_config_flags(p)

    p = sub.add_parser("flops", help="analytic prefill FLOPs per layer, baseline vs the configuration (no weights)",
                       description="Analytic prefill FLOPs (docs/fastmmoe.md section 4), baseline vs the "
                                   "configuration.")
    p.add_argument("model", help="a checkpoint dir, hub id or preset (real-size presets build on the meta device)")
    p.add_argument("--vision-tokens", type=int, default=1792,
                   help="vision tokens of the prompt (default 1792: an InternVL3.5 image tiled 6+1 x 256)")
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens of the prompt (default 64)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_config_flags(p)

    sub.add_parser("presets", help="list the built-in models and the authors' configurations",
                   description="List the built-in models (MODEL arguments) and configurations (--preset).")

    p = sub.add_parser("inspect", help="show an engine's manifest", description="Show an engine's manifest.")
    p.add_argument("engine")

    p = sub.add_parser("run", help="greedy answer of a VLM engine to images and a prompt",
                       description="Greedy generation of a VLM engine from image files and a prompt.")
    p.add_argument("engine", help="an engine directory compiled from a vision-language model")
    p.add_argument("--image", action="append", default=[], help="an image file; repeat for several images")
    p.add_argument("--prompt", required=True, help='the user turn; one "<image>" where each image goes')
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-chat", action="store_true", help="use the prompt as raw text, without the chat template")

    from . import bench

    p = sub.add_parser("bench", help="prefill latency and decode tokens/s, all methods side by side",
                       description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(p)
    _add_serve_parser(sub)
    p = sub.add_parser("env", help="versions, CPU and bf16 speed, GPUs, which backends run here (for bug reports)",
                       description="Report this machine for a bug report: Python, torch (and its CUDA), "
                                   "transformers and onnxruntime versions; the CPU, its capability and whether it "
                                   "runs bf16 GEMMs natively (timed); GPUs; which backends can compile and run here, "
                                   "and why not.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return top


def _add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible server on an engine (continuous batching)",
                       description="Serve an engine with the OpenAI API (/v1/chat/completions, /v1/completions, "
                                   "/v1/models), plus /health and /metrics. Needs the serve extra.")
    p.add_argument("engine", help="an engine directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="most requests in the running decode batch (default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="most requests waiting for a batch slot; beyond it 429 with Retry-After (default 64)")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1/* (default: none)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the engine "
                                                              "directory's name)")
    p.add_argument("--max-model-len", type=int, default=4096,
                   help="most prompt + new tokens per request (default 4096)")
    p.add_argument("--max-tokens", type=int, default=256, help="max_tokens of a request that sets none (default 256)")
    p.add_argument("--max-images", type=int, default=8, help="most images per request (default 8)")
    p.add_argument("--max-body-bytes", type=int, default=32 * 2 ** 20, help="largest request body (default 32 MiB)")
    p.add_argument("--max-image-bytes", type=int, default=20 * 2 ** 20, help="largest encoded image (default 20 MiB)")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096,
                   help="largest width x height of an image, checked before decoding (default 4096*4096)")
    p.add_argument("--allowed-local-media-path", default=None,
                   help="file:// image URLs may name files under this directory only (default: none allowed)")
    p.add_argument("--allow-image-fetch", action="store_true", help="allow http(s) image URLs (default: refused)")
    p.add_argument("--fetch-timeout", type=float, default=10.0, help="seconds per image fetch (default 10)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")


def _with_command(argv: list[str]) -> list[str]:
    """argv with the implicit `compile` made explicit: the bare `MODEL --out DIR` form."""
    if argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help", "--version"):
        return ["compile", *argv]
    return argv


# torch's own export/AOTInductor code still tests isinstance(spec, LeafSpec), which torch 2.13 deprecates:
# four FutureWarning lines per compile that the user can do nothing about. Only that warning, only in the CLI.
_TORCH_NOISE = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def main(argv: list[str] | None = None) -> int:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TORCH_NOISE, category=FutureWarning)
        return _run_main(argv)


def _run_main(argv: list[str] | None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # output piped into `head` and friends
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("fastmmoe-compile: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("fastmmoe-compile: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM


class _Terminated(BaseException):
    """SIGTERM, raised where the compile is, so that it unwinds (and cleans up) like Ctrl-C."""


@contextlib.contextmanager
def _sigterm_unwinds():
    """Python's default SIGTERM kills the process on the spot, leaving the partial engine dir."""
    terminated = False

    def stop(signum, frame):
        nonlocal terminated
        terminated = True
        # A signal that lands in a destructor (a __del__ the garbage collector runs then) has its
        # exception printed and swallowed: SIGALRM raises it again until the compile unwinds.
        signal.setitimer(signal.ITIMER_REAL, 0.25)
        raise _Terminated()

    def again(signum, frame):
        if terminated and not isinstance(sys.exc_info()[1], _Terminated):  # not while it unwinds (cleanup)
            signal.setitimer(signal.ITIMER_REAL, 0.25)
            raise _Terminated()

    def unraisable(info, hook=sys.unraisablehook):
        if info.exc_type is not _Terminated:  # the swallowed one is raised again: no "Exception ignored" noise
            hook(info)

    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    old = (signal.signal(signal.SIGTERM, stop), signal.signal(signal.SIGALRM, again), sys.unraisablehook) \
        if main_thread else None
    if main_thread:
        sys.unraisablehook = unraisable
    try:
        yield
    finally:
        if main_thread:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGTERM, old[0])
            signal.signal(signal.SIGALRM, old[1])
            sys.unraisablehook = old[2]


# Bad input: the package's UserInputError classes (errors.py: what the user typed, or the model and
# files it names) and the OS's for paths. Anything else (a plain ValueError included) is a bug.
_USER_ERRORS = (UserInputError, FileExistsError, FileNotFoundError, PermissionError)


@contextlib.contextmanager
def _warnings_on_one_line():
    """The package's warnings meant for the user (runtime.cpu.SlowBf16Warning) as one stderr line,
    "fastmmoe-compile: warning: ...", not Python's two (file:line, then the source line). Others as usual."""
    import warnings

    from .runtime.cpu import SlowBf16Warning

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, SlowBf16Warning):
            print(f"fastmmoe-compile: warning: {message}", file=sys.stderr, flush=True)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def _main(argv: list[str] | None) -> int:
    with _warnings_on_one_line():
        return _run_command(argv)


def _run_command(argv: list[str] | None) -> int:
    argv = _with_command(list(sys.argv[1:] if argv is None else argv))
    parser = _parser()
    if argv and argv[0] in SUBCOMMANDS:  # an unknown flag is the top parser's complaint: point at the command's -h
        parser.help_command = f"fastmmoe-compile {argv[0]} -h"
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        print(f"fastmmoe-compile: error: {e}", file=sys.stderr)
        return 2
    if args.command is None:
        print("fastmmoe-compile: error: a command or MODEL --out DIR is required (fastmmoe-compile -h)",
              file=sys.stderr)
        return 2
    try:
        return _COMMANDS[args.command](args)
    except Exception as e:
        if not isinstance(e, _USER_ERRORS):
            raise
        print(f"fastmmoe-compile: error: {_as_flags(str(e)) if isinstance(e, ConfigError) else e}", file=sys.stderr)
        return 2


def _compile(args) -> int:
    from .api import compile_model

    config = _config_from(args)
    with _sigterm_unwinds():
        compile_model(args.model, config, args.out, backend=args.backend, dtype=_dtype(args.dtype),
                      overwrite=args.overwrite, quiet=args.quiet, decode=not args.no_decode, device=args.device)
    return 0


def _diff(args) -> int:
    from .api import rewrite

    # The graph needs shapes, not weights: a directory with only a config.json is built on the meta device.
    _, _, record = rewrite(args.model, _config_from(args), dtype=_dtype(args.dtype), weights=False)
    sys.stdout.write(record.graph_diff)
    return 0


def _inspect(args) -> int:
    from .api import describe_engine

    print(describe_engine(args.engine))
    return 0


def _bench(args) -> int:
    from .bench import finish_args, run

    del args.command
    run(finish_args(args))
    return 0


def _run(args) -> int:
    from .runtime import load_engine
    from .runtime.frontends import PLACEHOLDER
    from .runtime.manifest import read_manifest
    from .runtime.multimodal import load_image, stream_text

    # Every input is checked before the engine loads (seconds to minutes): a typo costs nothing.
    if not args.prompt.strip():
        raise CliError('--prompt is empty: pass the question, with one "<image>" where each --image goes')
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.prompt.count(PLACEHOLDER) != len(args.image):
        raise CliError(f"--prompt has {args.prompt.count(PLACEHOLDER)} {PLACEHOLDER} placeholder(s) for "
                       f"{len(args.image)} --image(s): put one {PLACEHOLDER} where each image goes")
    for image in args.image:
        load_image(image)  # FileNotFoundError / EngineInputError naming the file
    read_manifest(args.engine, verify_hashes=False)  # not an engine: said before the load (which hashes it all)
    engine = load_engine(args.engine)
    if engine.front_end is None:
        raise CliError(f"{args.engine} is a text-only engine ({engine.info.get('model_type')} from "
                       f"{engine.info.get('source')}): run takes an engine compiled from a vision-language model; "
                       "run a text-only engine from Python (load_engine(DIR).generate(input_ids))")
    if engine.decode_step is None and args.max_new_tokens > 1:
        raise CliError(f"{args.engine} has no decode program (it was compiled with --no-decode): recompile "
                       "the model without --no-decode to run it (or pass --max-new-tokens 1)")
    pieces = stream_text(engine, args.image, args.prompt, args.max_new_tokens, chat=not args.no_chat)
    first = next(pieces, "")  # the first token's text, before anything is printed
    print(first, end="", flush=True)
    for piece in pieces:  # as the tokens come
        print(piece, end="", flush=True)
    print()
    return 0


def _flops(args) -> int:
    import json

    if args.text_tokens < 1 or args.vision_tokens < 0:
        raise CliError(f"--text-tokens must be >= 1 and --vision-tokens >= 0, got {args.text_tokens} and "
                       f"{args.vision_tokens}")
    from .flops import analytic_flops
    from .methods import method_of
    from .models import load_model
    from .models.presets import PRESETS

    config = _config_from(args)
    preset = PRESETS.get(args.model)
    if preset is not None and not preset.on_meta:
        import torch

        with torch.device("meta"):  # FLOPs need shapes, not weights
            loaded = preset.build()
    else:
        loaded = load_model(args.model, weights=False)  # a config.json alone is enough: built on meta
    family = loaded.family
    config.check_model(family.num_layers(loaded.config), family.top_k(loaded.config))
    base = analytic_flops(loaded, None, args.text_tokens, args.vision_tokens)
    fast = analytic_flops(loaded, config, args.text_tokens, args.vision_tokens)
    summary = {"model": args.model, "text_tokens": args.text_tokens, "vision_tokens": args.vision_tokens,
               "config": config.to_dict(), "baseline_flops": base.total, "fastmmoe_flops": fast.total,
               "reduction": 1 - fast.total / base.total, "ratio": base.total / fast.total}
    if args.json:
        print(json.dumps({**summary, "baseline_by_part": base.by_part, "fastmmoe_by_part": fast.by_part}))
        return 0
    print(f"workload: {args.text_tokens} text + {args.vision_tokens} vision tokens, batch 1, prefill "
          f"(attention counted on the full S x S matrix)\n")
    print(f"## {method_of(config).label}\n")
    print(fast.table())
    unit, scale = ("TFLOPs", 1e12) if base.total >= 1e12 else ("GFLOPs", 1e9)
    print(f"\nbaseline {base.total / scale:.3f} {unit} -> {fast.total / scale:.3f} {unit}: "
          f"{summary['reduction'] * 100:.1f}% fewer FLOPs ({summary['ratio']:.2f}x)")
    return 0


def _presets(args) -> int:
    from .models.presets import PRESETS

    rows = [(p.name, p.model_type, p.kind, p.description) for p in PRESETS.values()]
    widths = [max(len(r[i]) for r in rows + [("name", "family", "kind", "")]) for i in range(3)]
    print("Models (MODEL argument):")
    print(f"  {'name':<{widths[0]}}  {'family':<{widths[1]}}  {'kind':<{widths[2]}}  description")
    for r in rows:
        print(f"  {r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}")
    print("\nConfigurations (--preset NAME [--keep-ratio 0.75|0.5|0.25]):")
    for name, values in CONFIG_PRESETS.items():
        print(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    return 0


def _serve(args) -> int:
    from .serve import INSTALL, missing_dependencies

    missing = missing_dependencies()
    if missing:
        raise CliError(f"serve needs {', '.join(missing)}: {INSTALL}")
    from .serve.launch import ServeOptions, serve

    options = ServeOptions(
        host=args.host, port=args.port, max_batch=args.max_batch, max_queue=args.max_queue, api_key=args.api_key,
        served_model_name=args.served_model_name, max_model_len=args.max_model_len,
        default_max_tokens=args.max_tokens, max_images=args.max_images, max_body_bytes=args.max_body_bytes,
        max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
        allowed_local_media_path=args.allowed_local_media_path, allow_image_fetch=args.allow_image_fetch,
        fetch_timeout=args.fetch_timeout, log_level=args.log_level)
    try:
        options.check()
    except ValueError as e:
        raise CliError(str(e)) from e
    serve(args.engine, options)
    return 0


def _env(args) -> int:
    import json

    from .collect_env import collect, format_env

    env = collect()
    print(json.dumps(env, indent=2) if args.json else format_env(env))
    return 0


_COMMANDS = {"compile": _compile, "diff": _diff, "flops": _flops, "presets": _presets, "inspect": _inspect,
             "run": _run, "bench": _bench, "serve": _serve, "env": _env}


if __name__ == "__main__":
    raise SystemExit(main())
