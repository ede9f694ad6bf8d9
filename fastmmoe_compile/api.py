"""compile_model: load -> export -> passes -> lower -> engine, with progress on stderr."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import __version__
from .config import FastMMoEConfig, FastVConfig
from .export import export_backbone
from .lower import BACKENDS, compile_in_process, package_aoti
from .models import LoadedModel, load_model
from .models.registry import check_model_name
from .passes import PassRecord, apply_passes
from .runtime.engine import BACKBONE_FILE, DECODE_FILE, EMBEDDINGS_FILE, Engine, load_engine
from .runtime.manifest import atomic_directory, check_out, write_manifest
from .runtime.onnx_runtime import DECODE_ONNX_FILE, ONNX_FILE


@contextlib.contextmanager
def step(name: str, quiet: bool = False):
    if not quiet:
        print(f"[fastmmoe] {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    yield
    if not quiet:
        print(f"[fastmmoe] {name} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)


def rewrite(model_or_path, config: FastMMoEConfig | FastVConfig | None = None, *, dtype=None, quiet: bool = True,
            cache: bool = False):
    """Load, export and run the passes: (LoadedModel, rewritten ExportedProgram, PassRecord).
    With cache=True the program also returns every layer's KV cache (export/decode.py)."""
    config = config or FastMMoEConfig()
    with step("load", quiet), _users_model_kept(model_or_path):
        loaded = model_or_path if isinstance(model_or_path, LoadedModel) else load_model(model_or_path, dtype)
    config.check_model(loaded.family.num_layers(loaded.config), loaded.family.top_k(loaded.config))
    with step("export", quiet):
        program = export_backbone(loaded, cache=cache)
    with step("passes", quiet):
        program, record = apply_passes(program, config)
    return loaded, program, record


def compile_model(model_or_path, config: FastMMoEConfig | FastVConfig | None = None, out: str | os.PathLike | None = None, *,
                  backend: str = "inductor", dtype: torch.dtype | None = None, overwrite: bool = False,
                  quiet: bool = False, decode: bool = True) -> Engine:
    """Compile a Hugging Face MoE model with FastMMoE. With `out`, write and load an engine dir;
    without, return an engine compiled in this process with torch.compile.
    decode=True also compiles the one-token decode step, for generate."""
    if backend == "tensorrt":
        raise NotImplementedError("backend 'tensorrt' is not built yet: it needs TensorRT (a tensorrt extra) and a "
                                  "CUDA GPU; use 'inductor', 'onnx' or 'export'")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "onnx":
        from .lower.onnx import require_onnx

        require_onnx()  # before the minutes of export, not after
    # Say what is wrong before the minutes of loading and exporting: a mistyped model name, an
    # --out that exists and is no engine, or one that cannot be written.
    if isinstance(model_or_path, (str, os.PathLike)):
        check_model_name(os.fspath(model_or_path))
    if out is not None:
        check_out(out, overwrite)
    config = config or FastMMoEConfig()
    with _users_model_kept(model_or_path):
        return _compile(model_or_path, config, out, backend, dtype, overwrite, quiet, decode)


@contextlib.contextmanager
def _users_model_kept(model_or_path):
    """Loading and exporting switch a model to eval mode without gradients; a model object the
    user passed gets its own training flags and requires_grad back afterwards."""
    from .transformers_compat import frozen_for_export

    if isinstance(model_or_path, torch.nn.Module):
        with frozen_for_export(model_or_path):
            yield
    else:
        yield


def _compile(model_or_path, config, out, backend, dtype, overwrite, quiet, decode) -> Engine:
    loaded, program, record = rewrite(model_or_path, config, dtype=dtype, quiet=quiet, cache=decode)
    if loaded.on_meta:
        raise ValueError(f"{loaded.source} is a shape-only model on the meta device (no weights): it can be "
                         "exported, rewritten, diffed and FLOPs-counted, not compiled into an engine")
    info = loaded.describe()
    embeddings = loaded.family.decoder(loaded.lm).embed_tokens.weight.detach()
    if out is None:
        with step(f"lower ({'ONNX Runtime' if backend == 'onnx' else 'torch.compile'})", quiet):
            fn = _in_process(program, backend)
        engine = Engine(lambda *a: tuple(fn(*a)), info, embeddings, _manifest(loaded, config, record, backend))
        engine.front_end = _vision_in_process(loaded, backend, quiet)
        if decode:
            engine.decode_step = _in_process(_export_decode(loaded, quiet), backend, decode=True)
        return engine
    with atomic_directory(out, overwrite=overwrite) as tmp:
        with step(f"lower ({_LOWERING.get(backend, 'torch.export.save')})", quiet):
            _write_program(program, backend, tmp, BACKBONE_FILE, ONNX_FILE)
        _write_vision(loaded, tmp, backend, quiet)
        if decode:
            step_program = _export_decode(loaded, quiet)
            with step(f"lower decode step ({_LOWERING.get(backend, 'torch.export.save')})", quiet):
                _write_program(step_program, backend, tmp, DECODE_FILE, DECODE_ONNX_FILE)
        with step("write engine", quiet):
            from safetensors.torch import save_file

            save_file({"weight": embeddings.contiguous()}, str(tmp / EMBEDDINGS_FILE))
            _as_plain_file(tmp / EMBEDDINGS_FILE)
            (tmp / "graph_diff.txt").write_text(record.graph_diff)
            manifest = _manifest(loaded, config, record, backend)
            if decode:
                manifest["decode"] = {"file": DECODE_ONNX_FILE if backend == "onnx" else DECODE_FILE,
                                      "cache": "prefill returns key_l, value_l per layer"}
            write_manifest(tmp, manifest)
    if not quiet:
        print(f"[fastmmoe] engine written to {out}", file=sys.stderr)
    return load_engine(out)


_LOWERING = {"inductor": "AOTInductor", "onnx": "torch.onnx.export"}


def _as_plain_file(path: Path) -> None:
    """The mode open() would give (0666 less the umask): safetensors writes through a private
    (0600) temp file, and the engine's other files are as readable as any."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _export_decode(loaded: LoadedModel, quiet: bool):
    from .export.decode import export_decode

    with step("export decode step", quiet):
        return export_decode(loaded)


def _in_process(program, backend: str, decode: bool = False):
    """A program lowered in this process, as the engine calls it (backend as compile_model's)."""
    if backend == "onnx":
        return _onnx_in_process(program, decode)
    return compile_in_process(program) if backend == "inductor" else program.module()


def _onnx_in_process(program, decode: bool = False):
    """An ONNX Runtime session on the exported model (the files are only needed while it loads):
    the prefill backbone, or with decode=True the decode step."""
    import tempfile

    from .lower.onnx import export_onnx
    from .runtime.onnx_runtime import ONNX_FILE, OrtBackbone, OrtDecodeStep

    with tempfile.TemporaryDirectory(prefix="fastmmoe-onnx-") as d:
        if decode:
            return OrtDecodeStep(export_onnx(program, Path(d) / DECODE_ONNX_FILE))
        return OrtBackbone(export_onnx(program, Path(d) / ONNX_FILE))


def _vision_in_process(loaded: LoadedModel, backend: str, quiet: bool):
    """A VLM's front end (vision encoder compiled like the backbone), or None for a text model."""
    if loaded.vision is None:
        return None
    from .export.vision import export_vision
    from .runtime.multimodal import FrontEnd

    with step("export vision encoder", quiet):
        program = export_vision(loaded)
    encoder = _in_process(program, "inductor" if backend == "inductor" else "export")  # no ONNX vision encoder yet
    v = loaded.vision
    return FrontEnd(v.family, v.describe(), encoder, v.tokenizer, v.image_processor)


def _write_vision(loaded: LoadedModel, tmp: Path, backend: str, quiet: bool) -> None:
    """A VLM's vision encoder (vision.pt2) and input-processing files (processor/) into the engine dir."""
    if loaded.vision is None:
        return
    from .export.vision import export_vision
    from .runtime.multimodal import PROCESSOR_DIR, VISION_FILE

    with step("export vision encoder", quiet):
        program = export_vision(loaded)
    with step(f"lower vision encoder ({'AOTInductor' if backend == 'inductor' else 'torch.export.save'})", quiet):
        if backend == "inductor":
            package_aoti(program, str(tmp / VISION_FILE))
        else:
            torch.export.save(program, str(tmp / VISION_FILE))
    # The engine runs without the source checkpoint: its tokenizer, chat template and image processor come along.
    if loaded.vision.tokenizer is not None and loaded.vision.image_processor is not None:
        loaded.vision.tokenizer.save_pretrained(str(tmp / PROCESSOR_DIR))
        loaded.vision.image_processor.save_pretrained(str(tmp / PROCESSOR_DIR))


def _write_program(program, backend: str, tmp: Path, pt2_name: str, onnx_name: str) -> None:
    """One program into the engine dir, in the backend's format."""
    if backend == "inductor":
        package_aoti(program, str(tmp / pt2_name))
    elif backend == "onnx":
        from .lower.onnx import export_onnx

        export_onnx(program, tmp / onnx_name)
    else:
        torch.export.save(program, str(tmp / pt2_name))


def _manifest(loaded: LoadedModel, config: FastMMoEConfig | FastVConfig, record: PassRecord, backend: str) -> dict:
    import transformers

    return {
        "backend": backend,
        "model": loaded.describe(),
        "config": config.to_dict(),
        "passes": record.passes,
        **({"vision": loaded.vision.describe()} if loaded.vision is not None else {}),
        "versions": {"fastmmoe_compile": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }


def describe_engine(path) -> str:
    from .runtime.manifest import read_manifest

    m = read_manifest(path, verify_hashes=False)
    return json.dumps({k: m[k] for k in ("backend", "model", "vision", "config", "versions") if k in m}, indent=2)
