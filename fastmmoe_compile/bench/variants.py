"""The model under test and its variants: presets built on a device, the FastMMoE / Top-Kv / FastV /
SparseVLM configs of a run, and how each variant is lowered."""
from __future__ import annotations

import sys

import torch

from .options import BenchError, GROUPS


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
    """{row name: configuration}: unmodified, topkv, then each registered method's rows
    (Method.bench_config) at each of --keep-ratios, those --variants asks for."""
    from fastmmoe_compile.config import FastMMoEConfig, config_preset
    from fastmmoe_compile.methods import METHODS

    ratios = [float(r) for r in args.keep_ratios.split(",") if r]
    allv = {"unmodified": ("unmodified", FastMMoEConfig(vision_expert_ratio=1.0)),  # Kv == K: graph untouched
            "topkv": ("topkv", FastMMoEConfig(reduce_from_layer=2, vision_expert_ratio=0.5))}
    for r in ratios:
        tag = f"{round(r * 100):d}"
        for method in METHODS.values():
            cfg = method.bench_config(args, r, num_layers)
            if cfg is not None:
                allv[f"{method.name}-{tag}"] = (method.name, cfg)
    if "fastmmoe" in METHODS and not any(group == "fastmmoe" for group, _ in allv.values()):
        layers = list(config_preset(args.config_preset).merge_layers)
        print(f"[bench] no fastmmoe variants: {args.config_preset} merges at layers {layers}, "
              f"the model has {num_layers} (pick more --layers or another --config-preset)", file=sys.stderr)
    wanted = {w.strip() for w in args.variants.split(",") if w.strip()} | {"unmodified"}
    unknown = wanted - set(allv) - set(GROUPS) - set(METHODS)
    if unknown:
        raise BenchError(f"unknown variants {sorted(unknown)}; known: {', '.join(GROUPS)}, {', '.join(allv)}")
    return {name: cfg for name, (group, cfg) in allv.items() if name in wanted or group in wanted}


def compile_variant(program, inputs):
    """lower.compile_in_process (what compile_model(out=None) lowers with), compiled here by its first
    call (Inductor compiles lazily)."""
    from fastmmoe_compile.lower import compile_in_process

    fn = compile_in_process(program)
    with torch.no_grad():
        fn(*inputs)
    return fn


def unmodified_engine(loaded, config, lowering: str, decode: bool):
    """The unmodified model as `compile_model(..., out=None)` builds it in this process (eager
    ExportedProgram or torch.compile): its backbone is the unmodified variant's prefill and its
    decode path (Engine.start_decode / Engine.decode, what generate runs) decodes every variant:
    decode tokens are text tokens, which no pass changes."""
    from fastmmoe_compile.api import compile_model

    backend = "inductor" if lowering == "compiled" else "export"
    return compile_model(loaded, config, out=None, backend=backend, quiet=True, decode=decode)


def hf_prefill(loaded):
    """The transformers model's forward on the whole prompt (its default experts implementation)."""
    def run(embeds, positions):
        logits = loaded.lm(inputs_embeds=embeds, use_cache=False, logits_to_keep=1).logits[:, -1]
        return logits, torch.arange(embeds.shape[1], device=embeds.device)[None]
    return run
