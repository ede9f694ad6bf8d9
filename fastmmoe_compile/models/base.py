"""What the compiler needs to know about a model family, in one object per family.

Every fact about a family (where its MoE blocks are, how it routes, what a tiny
test model of it looks like) lives in its adapter file; the passes are family-blind.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..runtime.specs import InputSpec

@dataclass(frozen=True)
class MoEFamily:
    model_type: str  # transformers' config.model_type
    routing: str  # how the router scores and picks, in words (shown by `diff` and `presets`)
    tiny_config: Callable[[], object]  # a small random config of this family, for tests and presets
    experts_attr: str = "num_experts"  # the config attribute that holds E
    shared_experts: str = "none"  # shared-expert structure, in words
    # The inputs the exported prefill backbone takes after (inputs_embeds, vision_positions), in this
    # order: one runtime.specs.InputSpec each (shape, dtype, absent value, decode rule), written into
    # the manifest. Export, lowering and the runtime read them; only the family knows what they mean.
    input_specs: tuple[InputSpec, ...] = ()
    # (input name, the HF decoder's keyword for it) where they differ, e.g. 3D rotary positions -> position_ids.
    decoder_keywords: tuple[tuple[str, str], ...] = ()

    @property
    def extra_inputs(self) -> tuple[str, ...]:
        """The names of input_specs, in order."""
        return tuple(spec.name for spec in self.input_specs)

    # --- facts read off a config -------------------------------------------------
    def num_experts(self, config) -> int:
        return int(getattr(config, self.experts_attr))

    def top_k(self, config) -> int:
        return int(config.num_experts_per_tok)

    def num_layers(self, config) -> int:
        return int(config.num_hidden_layers)

    def input_facts(self, config) -> dict:
        """The model facts input_specs' sizes name beyond hidden_size, {fact: int} (manifest model section)."""
        return {}

    # --- where things are in a *ForCausalLM module ------------------------------
    def decoder(self, lm: torch.nn.Module) -> torch.nn.Module:
        return lm.model

    def run_decoder(self, lm: torch.nn.Module, inputs_embeds: torch.Tensor, position_ids=None,
                    **extras) -> torch.Tensor:
        """The decoder's last hidden state [B, S, H]. position_ids: None (0..S-1) or [B, S] (decode).
        extras: the prefill's extra inputs (input_specs) by name, and any other HF decoder keyword;
        each goes to the HF decoder under its decoder_keywords name (e.g. M-RoPE families' 3D
        positions [3, B, S] as position_ids: transformers' multimodal-rotary text models take them
        there, and expand [B, S] to 3 equal rows). A None input leaves the keyword it renames to as is."""
        kwargs = {"position_ids": position_ids}
        rename = dict(self.decoder_keywords)
        for name, value in extras.items():
            key = rename.get(name, name)
            if value is not None or key not in kwargs:
                kwargs[key] = value
        return self.decoder(lm)(inputs_embeds=inputs_embeds, use_cache=False, **kwargs).last_hidden_state

    def moe_blocks(self, lm: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
        """(layer index, MoE block) for every routed-MoE layer; dense layers are skipped."""
        return [
            (i, layer.mlp)
            for i, layer in enumerate(self.decoder(lm).layers)
            if hasattr(layer.mlp, "experts") and hasattr(layer.mlp, "gate")
        ]

    def experts_modules(self, lm: torch.nn.Module) -> list[torch.nn.Module]:
        return [block.experts for _, block in self.moe_blocks(lm)]

