"""compile_model: load -> export -> passes -> lower -> engine, with progress on stderr."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .config import FastMMoEConfig
from .errors import ShapeOnlyModelError
from .export import export_backbone
from .lower.backends import BACKENDS, Backend, get_backend, vision_backend
from .lower.weights import WEIGHTS_FILE, SharedWeights
from .models import LoadedModel, load_model
from .methods import Config, apply_passes, method_of
from .models.registry import check_model_name
from .passes import PassRecord
from .runtime.device import DEFAULT_DTYPE, DeviceError, on_device, require_device
from .runtime.engine import EMBEDDINGS_FILE, Engine, load_engine
from .runtime.manifest import atomic_directory, check_out, current_umask, write_manifest


@contextlib.contextmanager
def step(name: str, quiet: bool = False):
    if not quiet:
        print(f"[fastmmoe] {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    yield
    if not quiet:
        print(f"[fastmmoe] {name} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)


def rewrite(model_or_path, config: Config | None = None, *, dtype=None,
            quiet: bool = True, cache: bool = False, device=None, weights: bool = True):
    """Load, export and run the passes of `config` (a registered method's configuration, methods.METHODS;
    None: FastMMoEConfig()): (LoadedModel, rewritten ExportedProgram, PassRecord).
    With cache=True the program also returns every layer's KV cache (export/decode.py).
    device: where the weights go (load_model); the program is exported there.
    weights=False: a checkpoint dir with only a config.json is built on the meta device (load_model)."""
    config = config or FastMMoEConfig()
    with step("load", quiet), _users_model_kept(model_or_path):
        loaded = model_or_path if isinstance(model_or_path, LoadedModel) else load_model(model_or_path, dtype, device,
                                                                                          weights=weights)
    config.check_model(loaded.family.num_layers(loaded.config), loaded.family.top_k(loaded.config))
    with step("export", quiet):
        program = export_backbone(loaded, cache=cache)
    with step("passes", quiet):
        program, record = apply_passes(program, config)
    return loaded, program, record


def rewrite_each(model_or_path, configs: dict, *, dtype=None, quiet: bool = True, cache: bool = False, device=None,
                 on_done=None):
    """rewrite() for several configurations of one model, exporting it once: (LoadedModel,
    {name: (rewritten ExportedProgram, PassRecord)}) in the order of `configs` ({name: config}).
    Each configuration's passes run on a copy of the exported graph (torch_compat.copy_program:
    the weights are shared, not copied), so a 48-layer backbone is exported once, not once per
    configuration. on_done(name, seconds) is called after each configuration's passes."""
    from .torch_compat import copy_program

    with step("load", quiet), _users_model_kept(model_or_path):
        loaded = model_or_path if isinstance(model_or_path, LoadedModel) else load_model(model_or_path, dtype, device)
    num_layers, top_k = loaded.family.num_layers(loaded.config), loaded.family.top_k(loaded.config)
    for config in configs.values():
        config.check_model(num_layers, top_k)  # every refusal before the minutes of export
    with step("export", quiet):
        exported = export_backbone(loaded, cache=cache)
    rewritten = {}
    for name, config in configs.items():
        t = time.perf_counter()
        with step(f"passes ({name})", quiet):
            rewritten[name] = apply_passes(copy_program(exported), config)
        if on_done is not None:
            on_done(name, time.perf_counter() - t)
    return loaded, rewritten


def engine_in_process(loaded: LoadedModel, program, record: PassRecord, config, *, backend: str = "export",
                      decode: bool = True, quiet: bool = True) -> Engine:
    """The engine compile_model(loaded, config, out=None, backend=backend) returns, built from a program
    already rewritten for `config` (rewrite_each): only the decode step (decode=True) is exported here."""
    device = target_device(loaded, None, backend)
    method_of(config).check_backend(config, backend)
    table = loaded.family.decoder(loaded.lm).embed_tokens.weight.detach()
    return _in_process(loaded, program, get_backend(backend), config, record, table.cpu(), quiet, decode, device)


def compile_model(model_or_path, config: Config | None = None, out: str | os.PathLike | None = None, *,
                  backend: str = "inductor", dtype: torch.dtype | None = None, overwrite: bool = False,
                  quiet: bool = False, decode: bool = True, device: str | torch.device | None = None) -> Engine:
    """Compile a Hugging Face MoE model with FastMMoE. With `out`, write and load an engine dir;
    without, return an engine compiled in this process with torch.compile.
    decode=True also compiles the one-token decode step, for generate.
    device: "cpu" or "cuda" (None: an in-memory model's own device, else the CPU); the engine runs
    there and the manifest records it. dtype None: bfloat16 on cuda; on the CPU the checkpoint's,
    except that a bfloat16 checkpoint becomes float32 where this CPU has no native bf16 GEMMs
    (runtime/cpu.py), and float32 for the onnx backend and for random presets (choose_dtype).
    The choice and its reason go into the manifest ("dtype", "dtype_reason") and one progress
    line; a bfloat16 engine for a slow-bf16 CPU (asked for, or an in-memory bf16 model) is
    compiled as asked, with a runtime.cpu.SlowBf16Warning. runtime.device.DeviceError, before any
    work, for a device this machine lacks or one the backend cannot target."""
    backend = get_backend(backend)  # an unknown name, or one that cannot run here: before the minutes of export
    device = target_device(model_or_path, device, backend.name)
    # Say what is wrong before the minutes of loading and exporting: a mistyped model name, an
    # --out that exists and is no engine, or one that cannot be written.
    if isinstance(model_or_path, (str, os.PathLike)):
        check_model_name(os.fspath(model_or_path))
    if out is not None:
        check_out(out, overwrite)
    config = config or FastMMoEConfig()
    method_of(config).check_backend(config, backend.name)
    choice = choose_dtype(model_or_path, dtype, device, backend.name)  # warns here, before the minutes of work
    with _users_model_kept(model_or_path):
        return _compile(model_or_path, config, out, backend, choice, overwrite, quiet, decode, device)


@dataclass
class DtypeChoice:
    """The engine's weights dtype and why. dtype None: the checkpoint's own (from_pretrained's
    "auto"), known once loaded (settle()). warned: a SlowBf16Warning was given already."""
    dtype: torch.dtype | None
    reason: str
    warned: bool = False

    def settle(self, loaded_dtype: torch.dtype, device: str) -> None:
        """After loading: a bfloat16 checkpoint whose dtype could not be read beforehand (a hub id)
        and now targets a slow-bf16 CPU gets its warning and the reason says so."""
        if self.warned or device != "cpu" or loaded_dtype != torch.bfloat16:
            return
        from .runtime.cpu import SlowBf16Warning, bf16_speed, slow_bf16_message

        speed = bf16_speed()
        if not speed.native:
            self.reason += f" (bfloat16, known only once loaded), although {speed.describe()}"
            message = slow_bf16_message("the checkpoint is bfloat16 (known only once loaded)",
                                        _SLOWER + " (--dtype float32)", speed)
            warnings.warn(SlowBf16Warning(message), stacklevel=3)
            self.warned = True


_SLOWER = "the engine runs its matmuls that much slower than a float32 one"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def choose_dtype(model_or_path, dtype: torch.dtype | None, device: str, backend: str = "inductor") -> DtypeChoice:
    """The weights dtype compile_model loads `model_or_path` in for `device`, with its reason (one
    clause, for the manifest and the progress line):
    - dtype given: that one; bfloat16 on a CPU without native bf16 GEMMs warns (SlowBf16Warning, one line).
    - an in-memory model: its own (the compiler does not convert the user's object); warns likewise.
    - cuda: bfloat16 (runtime.device.DEFAULT_DTYPE).
    - cpu, a preset: float32 (random weights).
    - cpu, a checkpoint: its stored dtype (models.loading.stored_dtype), except float32 where that
      is bfloat16 and this CPU has no native bf16 GEMMs (runtime.cpu.bf16_speed), and float32 for
      the onnx backend (float32 only). Unknown before loading (a hub id): the checkpoint's own.
    The CPU probe takes up to ~1 s, once per process. Raises runtime.cpu.CpuCapabilityError for a
    malformed FASTMMOE_CPU_CAPABILITY (CPU targets)."""
    from .models.loading import stored_dtype
    from .models.presets import PRESETS
    from .runtime.cpu import SlowBf16Warning, bf16_speed, slow_bf16_message

    if device == "cpu":
        bf16_speed()  # a malformed FASTMMOE_CPU_CAPABILITY fails here, before any work; the timing is cached

    def slow_warning(what: str, advice: str) -> bool:
        if device == "cpu" and not bf16_speed().native:
            warnings.warn(SlowBf16Warning(slow_bf16_message(what, advice)), stacklevel=3)
            return True
        return False

    if dtype is not None:
        warned = dtype == torch.bfloat16 and slow_warning("bfloat16 asked for (compiled as asked)",
                                                           _SLOWER + " (omit --dtype for float32)")
        return DtypeChoice(dtype, f"{_name(dtype)} as asked (--dtype / dtype=)", warned)
    if isinstance(model_or_path, (torch.nn.Module, LoadedModel)):
        param = _first_parameter(model_or_path)
        own = param.dtype if param is not None else None
        warned = own == torch.bfloat16 and slow_warning("the model object is bfloat16 (compiled as it is)",
                                                         _SLOWER + " (model.float() first)")
        return DtypeChoice(None, f"the model object's own ({_name(own) if own else 'no parameters'})", warned)
    if DEFAULT_DTYPE[device] is not None:
        return DtypeChoice(DEFAULT_DTYPE[device], f"{_name(DEFAULT_DTYPE[device])}: the default on {device}")
    name = os.fspath(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else None
    if name in PRESETS:
        return DtypeChoice(None, "the preset's random weights (float32 on the CPU)")
    stored = stored_dtype(name) if name is not None else None
    if stored is None:
        return DtypeChoice(None, "the checkpoint's own")
    if backend == "onnx" and stored != torch.float32:
        return DtypeChoice(torch.float32, f"float32, not the checkpoint's {_name(stored)}: the onnx backend runs "
                                          "float32 only")
    if stored == torch.bfloat16:
        speed = bf16_speed()
        if not speed.native:
            return DtypeChoice(torch.float32, f"float32, not the checkpoint's bfloat16: {speed.describe()}; "
                                              "--dtype bfloat16 keeps bf16")
        return DtypeChoice(None, f"the checkpoint's bfloat16: {speed.describe()}")
    return DtypeChoice(None, f"the checkpoint's {_name(stored)}")  # None: loaded as before, as stored


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


def target_device(model_or_path, device, backend: str = "inductor") -> str:
    """"cpu" or "cuda": `device`, or where an in-memory model is (None). DeviceError where this
    machine lacks it, or the backend cannot target it."""
    if device is None:
        param = _first_parameter(model_or_path)
        device = "cpu" if param is None or param.device.type == "meta" else param.device
    name = require_device(device)
    why_not = BACKENDS[backend].devices.get(name, f"does not target {name}") if backend in BACKENDS else None
    if why_not is not None:
        raise DeviceError(f"--backend {backend} {why_not}")
    return name


def _first_parameter(model_or_path):
    module = model_or_path.lm if isinstance(model_or_path, LoadedModel) else model_or_path
    if isinstance(module, torch.nn.Module):
        return next(module.parameters(), None)
    return None


def _compile(model_or_path, config, out, backend: Backend, choice: DtypeChoice, overwrite, quiet, decode,
             device="cpu") -> Engine:
    loaded, program, record = rewrite(model_or_path, config, dtype=choice.dtype, quiet=quiet, cache=decode,
                                      device=device)
    if loaded.on_meta:
        raise ShapeOnlyModelError(f"{loaded.source} is a shape-only model on the meta device (no weights): it can be "
                         "exported, rewritten, diffed and FLOPs-counted, not compiled into an engine")
    choice.settle(next(loaded.lm.parameters()).dtype, device)
    if not quiet:
        print(f"[fastmmoe] dtype {loaded.describe()['dtype']}: {choice.reason}", file=sys.stderr, flush=True)
    # The token-embedding table stays on the host (runtime/device.py): prompts are embedded there.
    table = loaded.family.decoder(loaded.lm).embed_tokens.weight.detach()
    if out is None:
        return _in_process(loaded, program, backend, config, record, table.cpu(), quiet, decode, device, choice)
    weights = SharedWeights()  # every program's tensors, written once below
    with atomic_directory(out, overwrite=overwrite) as tmp:
        programs = {"backbone": _write_program(program, backend, tmp, "backbone", quiet, weights)}
        if loaded.vision is not None:
            programs["vision"] = _write_vision(loaded, tmp, backend, quiet, weights)
        if decode:
            programs["decode"] = _write_program(_export_decode(loaded, quiet), backend, tmp, "decode", quiet, weights)
            programs["decode"]["cache"] = "prefill returns key_l, value_l per layer"
        with step("write engine", quiet):
            files = _write_weights(tmp, weights, table)
            (tmp / "graph_diff.txt").write_text(record.graph_diff)
            manifest = _manifest(loaded, config, record, backend.name, programs, device, choice)
            write_manifest(tmp, {**manifest, **files})
    if not quiet:
        print(f"[fastmmoe] engine written to {out}", file=sys.stderr)
    from .runtime.cpu import SlowBf16Warning

    with warnings.catch_warnings():  # choose_dtype gave the slow-bf16 warning already
        warnings.simplefilter("ignore", SlowBf16Warning)
        return load_engine(out)


def _write_weights(tmp: Path, weights: SharedWeights, table: torch.Tensor) -> dict:
    """The weights file (where programs take their weights from it) with the token-embedding table
    [vocab, H] stored once in it (format 4: the backbone's own embed_tokens weight, under its
    key), else the table alone in embeddings.safetensors. Returns the manifest's "embeddings"
    ({"file", "tensor": its key in the file}) and "weights" ({"file"}, where written) entries."""
    if not weights.tensors:  # no program takes its weights from a shared file (no such backend is built-in)
        from safetensors.torch import save_file

        save_file({"weight": table.cpu().contiguous()}, str(tmp / EMBEDDINGS_FILE))
        _as_plain_file(tmp / EMBEDDINGS_FILE)
        return {"embeddings": {"file": EMBEDDINGS_FILE, "tensor": "weight"}}
    key = weights.include("embed_tokens.weight", table)
    weights.save(tmp / WEIGHTS_FILE)
    _as_plain_file(tmp / WEIGHTS_FILE)
    return {"embeddings": {"file": WEIGHTS_FILE, "tensor": key}, "weights": {"file": WEIGHTS_FILE}}


def _in_process(loaded, program, backend: Backend, config, record, embeddings, quiet, decode, device="cpu",
                choice: DtypeChoice | None = None) -> Engine:
    """An engine whose programs are built in this process by `backend` (torch.compile, ONNX Runtime, eager)."""
    with step(f"lower ({backend.in_process_label})", quiet):
        fn = on_device(backend.in_process(program, "backbone"), device)
    front_end = None
    if loaded.vision is not None:
        from .export.vision import export_vision
        from .runtime.multimodal import FrontEnd

        with step("export vision encoder", quiet):
            encoder = on_device(vision_backend(backend).in_process(export_vision(loaded), "vision"), device,
                                outputs_to_host=True)
        v = loaded.vision
        front_end = FrontEnd(v.family, v.describe(), encoder, v.tokenizer, v.image_processor)
    step_fn = on_device(backend.in_process(_export_decode(loaded, quiet), "decode") if decode else None, device)
    manifest = _manifest(loaded, config, record, backend.name, None, device, choice)
    return Engine(lambda *a: tuple(fn(*a)), loaded.describe(), embeddings, manifest,
                  front_end=front_end, decode_step=step_fn)


def _as_plain_file(path: Path) -> None:
    """The mode open() would give (0666 less the umask): safetensors writes through a private
    (0600) temp file, and the engine's other files are as readable as any."""
    path.chmod(0o666 & ~current_umask())


def _export_decode(loaded: LoadedModel, quiet: bool):
    from .export.decode import export_decode

    with step("export decode step", quiet):
        return export_decode(loaded)


def _write_vision(loaded: LoadedModel, tmp: Path, backend: Backend, quiet: bool, weights: SharedWeights) -> dict:
    """A VLM's vision encoder and input-processing files (processor/) into the engine dir; its programs entry."""
    from .export.vision import export_vision
    from .runtime.multimodal import PROCESSOR_DIR

    with step("export vision encoder", quiet):
        program = export_vision(loaded)
    writer = vision_backend(backend)
    entry = _write_program(program, writer, tmp, "vision", quiet, weights)
    # The engine runs without the source checkpoint: its tokenizer, chat template and image processor come along.
    if loaded.vision.tokenizer is not None and loaded.vision.image_processor is not None:
        loaded.vision.tokenizer.save_pretrained(str(tmp / PROCESSOR_DIR))
        loaded.vision.image_processor.save_pretrained(str(tmp / PROCESSOR_DIR))
    return entry if writer is backend else {**entry, "backend": writer.name}


def _write_program(program, backend: Backend, tmp: Path, role: str, quiet: bool, weights: SharedWeights) -> dict:
    """One program into the engine dir, in the backend's format; its manifest["programs"] entry
    ("weights": its names that differ from their key in the shared weights file, where the
    backend stores the weights there)."""
    name = backend.file(role)
    with step(f"lower {'' if role == 'backbone' else role + ' '}({backend.lowering})", quiet):
        if backend.external_data:
            extra = backend.write(program, tmp / name, role, weights) or {}
        else:
            backend.write(program, tmp / name, role)
            extra = {}
    if backend.shared_weights:
        return {"file": name, **extra, "weights": weights.add(role, program)}
    return {"file": name, **extra}


def _manifest(loaded: LoadedModel, config: Config, record: PassRecord, backend: str,
              programs: dict | None, device: str, choice: DtypeChoice | None = None) -> dict:
    """What load_engine reads: backend, each role's program file, device and dtype, the model's
    facts; also why that dtype ("dtype_reason") and, for a CPU engine, the compiling CPU's bf16
    facts ("cpu": runtime.cpu.Bf16Speed.as_dict() and its model name)."""
    import transformers

    info = loaded.describe()
    cpu = {}
    if device == "cpu":
        from .runtime.cpu import bf16_speed, cpu_model

        cpu = {"cpu": {"model": cpu_model(), **bf16_speed().as_dict()}}
    return {
        "backend": backend,
        **({"programs": programs} if programs is not None else {}),
        "device": device,
        "dtype": info["dtype"],
        **({"dtype_reason": choice.reason} if choice is not None else {}),
        **cpu,
        "model": info,
        "config": config.to_dict(),
        "passes": record.passes,
        **({"vision": loaded.vision.describe()} if loaded.vision is not None else {}),
        "versions": {"fastmmoe_compile": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }


def describe_engine(path) -> str:
    from .runtime.manifest import check_integrity, read_manifest

    m = read_manifest(path, verify_hashes=False)
    check_integrity(path, m)  # inspect shows nothing the engine would not run
    keys = ("backend", "device", "dtype", "dtype_reason", "cpu", "programs", "model", "vision", "config", "versions")
    return json.dumps({k: m[k] for k in keys if k in m}, indent=2)
