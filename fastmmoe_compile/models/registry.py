"""Turn what the user names (a model object, a checkpoint dir, a hub id, a preset) into a model."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import deepseek, mixtral, olmoe, qwen2_moe, qwen3_moe
from .base import MoEFamily

FAMILIES: dict[str, MoEFamily] = {
    f.model_type: f
    for f in (
        qwen3_moe.FAMILY, qwen2_moe.FAMILY, olmoe.FAMILY, mixtral.FAMILY,
        deepseek.DEEPSEEK_V2, deepseek.DEEPSEEK_V3, deepseek.GLM4_MOE,
    )
}


class UnsupportedModelError(ValueError):
    """The model is not a routed-MoE family this compiler knows."""


@dataclass
class LoadedModel:
    lm: torch.nn.Module  # a transformers *ForCausalLM
    family: MoEFamily
    source: str  # what the user named: preset, path, hub id or "<in-memory model>"

    @property
    def config(self):
        return self.lm.config

    @property
    def on_meta(self) -> bool:
        return next(self.lm.parameters()).device.type == "meta"

    def describe(self) -> dict:
        c = self.config
        return {
            "source": self.source,
            "model_type": self.family.model_type,
            "num_layers": self.family.num_layers(c),
            "moe_layers": [i for i, _ in self.family.moe_blocks(self.lm)],
            "num_experts": self.family.num_experts(c),
            "top_k": self.family.top_k(c),
            "hidden_size": int(c.hidden_size),
            "vocab_size": int(c.vocab_size),
            "dtype": str(next(self.lm.parameters()).dtype).replace("torch.", ""),
        }


def family_for(config) -> MoEFamily:
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    supported = ", ".join(sorted(FAMILIES))
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not a supported routed-MoE family. Supported: {supported}"
    )


def load_model(model_or_path, dtype: torch.dtype | None = None) -> LoadedModel:
    """A PreTrainedModel, a preset name, a local checkpoint directory, or a hub id."""
    from transformers import PreTrainedModel

    from .presets import PRESETS

    if isinstance(model_or_path, PreTrainedModel):
        lm = model_or_path
        family = family_for(lm.config)
        _check_causal_lm(lm)
        return LoadedModel(lm.to(dtype) if dtype else lm, family, "<in-memory model>")
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise TypeError(f"expected a PreTrainedModel, a path, a hub id or a preset name, got {type(model_or_path)}")
    name = os.fspath(model_or_path)
    if name in PRESETS:
        return PRESETS[name].build(dtype=dtype)
    return _from_pretrained(name, dtype)


def _from_pretrained(name: str, dtype) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    if not os.path.isdir(name) and (os.path.sep in name.rstrip("/").split("/", 1)[-1] or name.startswith((".", "/"))):
        raise FileNotFoundError(f"no checkpoint directory at {name!r}")
    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as e:
        from .presets import PRESETS

        raise FileNotFoundError(
            f"could not load a config from {name!r} (not a local checkpoint, and the hub is not reachable or has "
            f"no such model): {e}\nBuilt-in presets: {', '.join(PRESETS)}"
        ) from e
    family = family_for(config)  # fail before reading any weights
    lm = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or "auto", attn_implementation="sdpa")
    _check_causal_lm(lm)
    return LoadedModel(lm, family, name)


def _check_causal_lm(lm) -> None:
    if not (hasattr(lm, "model") and hasattr(lm, "lm_head")):
        raise UnsupportedModelError(
            f"{type(lm).__name__} is not a *ForCausalLM with .model and .lm_head; pass the language model"
        )
