"""The families this compiler knows, and the model object every pass takes (LoadedModel).

registry.py turns what the user names into a LoadedModel; presets.py builds the built-in ones.
Both import this module, so neither imports the other's internals back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UnsupportedModelError  # noqa: F401  (re-exported: models.UnsupportedModelError)
from . import deepseek, deepseek_vl2, internvl, mixtral, olmoe, qwen2_moe, qwen3_moe, qwen3_vl_moe
from . import glm4v_moe
from .base import MoEFamily
from .vlm import VisionParts, VLMFamily

FAMILIES: dict[str, MoEFamily] = {
    f.model_type: f
    for f in (
        qwen3_moe.FAMILY, qwen2_moe.FAMILY, olmoe.FAMILY, mixtral.FAMILY, qwen3_vl_moe.TEXT_FAMILY,
        deepseek.DEEPSEEK_V2, deepseek.DEEPSEEK_V3, deepseek.GLM4_MOE, deepseek.DEEPSEEK_MHA,
        glm4v_moe.TEXT_FAMILY,
    )
}

# Vision-language families: a vision encoder in front of one of the MoE backbones above.
VLM_FAMILIES: dict[str, VLMFamily] = {
    f.model_type: f for f in (internvl.FAMILY, deepseek_vl2.FAMILY, qwen3_vl_moe.FAMILY, glm4v_moe.FAMILY)
}


@dataclass
class LoadedModel:
    lm: torch.nn.Module  # a transformers *ForCausalLM
    family: MoEFamily
    source: str  # what the user named: preset, path, hub id or "<in-memory model>"
    vision: VisionParts | None = None  # the vision encoder and input processing of a VLM

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
            **({"extra_inputs": list(self.family.extra_inputs), **self.family.input_facts(c),
                "input_specs": [spec.to_dict() for spec in self.family.input_specs]}
               if self.family.input_specs else {}),
        }


def family_for(config) -> MoEFamily:
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    supported = ", ".join(sorted(FAMILIES))
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not a supported routed-MoE family. Supported: {supported}"
    )


def load_vlm(model, source: str, tokenizer=None, image_processor=None) -> LoadedModel:
    """A HF VLM -> its backbone as the LoadedModel every pass takes, plus its vision parts."""
    vlm = VLM_FAMILIES[model.config.model_type]
    text_config = vlm.text_config(model.config)
    try:
        family = family_for(text_config)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{model.config.model_type} with a {text_config.model_type!r} language model: {e}") from None
    model = model.eval()
    vision = VisionParts(vlm, model, vlm.encoder(model), tokenizer, image_processor)
    return LoadedModel(vlm.causal_lm(model), family, source, vision)
