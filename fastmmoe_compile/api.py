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
from .passes import PassRecord, apply_passes
from .runtime.engine import BACKBONE_FILE, EMBEDDINGS_FILE, Engine, load_engine
from .runtime.manifest import atomic_directory, write_manifest


@contextlib.contextmanager
def step(name: str, quiet: bool = False):
    if not quiet:
        print(f"[fastmmoe] {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    yield
    if not quiet:
        print(f"[fastmmoe] {name} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)


def rewrite(model_or_path, config: FastMMoEConfig | FastVConfig | None = None, *, dtype=None, quiet: bool = True):
    """Load, export and run the passes: (LoadedModel, rewritten ExportedProgram, PassRecord)."""
    config = config or FastMMoEConfig()
    with step("load", quiet):
        loaded = model_or_path if isinstance(model_or_path, LoadedModel) else load_model(model_or_path, dtype)
    config.check_model(loaded.family.num_layers(loaded.config), loaded.family.top_k(loaded.config))
    with step("export", quiet):
        program = export_backbone(loaded)
    with step("passes", quiet):
        program, record = apply_passes(program, config)
    return loaded, program, record


def compile_model(model_or_path, config: FastMMoEConfig | FastVConfig | None = None, out: str | os.PathLike | None = None, *,
                  backend: str = "inductor", dtype: torch.dtype | None = None, overwrite: bool = False,
                  quiet: bool = False) -> Engine:
    """Compile a Hugging Face MoE model with FastMMoE. With `out`, write and load an engine dir;
    without, return an engine compiled in this process with torch.compile."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if out is not None and Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    config = config or FastMMoEConfig()
    loaded, program, record = rewrite(model_or_path, config, dtype=dtype, quiet=quiet)
    if loaded.on_meta:
        raise ValueError(f"{loaded.source} is a shape-only model on the meta device (no weights): it can be "
                         "exported, rewritten, diffed and FLOPs-counted, not compiled into an engine")
    info = loaded.describe()
    embeddings = loaded.family.decoder(loaded.lm).embed_tokens.weight.detach()
    if out is None:
        with step("lower (torch.compile)", quiet):
            fn = compile_in_process(program) if backend == "inductor" else program.module()
        return Engine(lambda *a: tuple(fn(*a)), info, embeddings, _manifest(loaded, config, record, backend))
    with atomic_directory(out, overwrite=overwrite) as tmp:
        with step(f"lower ({'AOTInductor' if backend == 'inductor' else 'torch.export.save'})", quiet):
            if backend == "inductor":
                package_aoti(program, str(tmp / BACKBONE_FILE))
            else:
                torch.export.save(program, str(tmp / BACKBONE_FILE))
        with step("write engine", quiet):
            from safetensors.torch import save_file

            save_file({"weight": embeddings.contiguous()}, str(tmp / EMBEDDINGS_FILE))
            (tmp / "graph_diff.txt").write_text(record.graph_diff)
            write_manifest(tmp, _manifest(loaded, config, record, backend))
    if not quiet:
        print(f"[fastmmoe] engine written to {out}", file=sys.stderr)
    return load_engine(out)


def _manifest(loaded: LoadedModel, config: FastMMoEConfig | FastVConfig, record: PassRecord, backend: str) -> dict:
    import transformers

    return {
        "backend": backend,
        "model": loaded.describe(),
        "config": config.to_dict(),
        "passes": record.passes,
        "versions": {"fastmmoe_compile": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }


def describe_engine(path) -> str:
    from .runtime.manifest import read_manifest

    m = read_manifest(path, verify_hashes=False)
    return json.dumps({k: m[k] for k in ("backend", "model", "config", "versions")}, indent=2)
