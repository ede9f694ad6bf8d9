"""What the compiler needs to know about a model family, in one object per family.

Every fact about a family (where its MoE blocks are, how it routes, what a tiny
test model of it looks like) lives in its adapter file; the passes are family-blind.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

# Decoder-layer index in a module path, e.g. "lm.model.layers.7.mlp.gate".
LAYER_PATTERN = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class MoEFamily:
    model_type: str  # transformers' config.model_type
    routing: str  # how the router scores and picks, in words (shown by `diff` and `presets`)
    tiny_config: Callable[[], object]  # a small random config of this family, for tests and presets
    experts_attr: str = "num_experts"  # the config attribute that holds E
    shared_experts: str = "none"  # shared-expert structure, in words
    # Inputs the exported prefill backbone takes after (inputs_embeds, vision_positions), in this order:
    #   "rope_positions" [3, B, S] int64: multimodal rotary positions (temporal, height, width; Qwen3-VL, GLM-4.5V)
    #   "deepstack" [D, B, S, H]: visual features added to the residual stream after decoder layers 0..D-1,
    #       zero at text positions (Qwen3-VL). Sequence-indexed, so a merge gathers them like any other.
    extra_inputs: tuple[str, ...] = ()

    # --- facts read off a config -------------------------------------------------
    def num_experts(self, config) -> int:
        return int(getattr(config, self.experts_attr))

    def top_k(self, config) -> int:
        return int(config.num_experts_per_tok)

    def num_layers(self, config) -> int:
        return int(config.num_hidden_layers)

    def deepstack_layers(self, config) -> int:
        """D of the "deepstack" input (0: the family takes none)."""
        return 0

    # --- where things are in a *ForCausalLM module ------------------------------
    def decoder(self, lm: torch.nn.Module) -> torch.nn.Module:
        return lm.model

    def run_decoder(self, lm: torch.nn.Module, inputs_embeds: torch.Tensor, position_ids=None,
                    rope_positions=None, **decoder_kwargs) -> torch.Tensor:
        """The decoder's last hidden state [B, S, H]. position_ids: None (0..S-1) or [B, S] (decode).
        rope_positions [3, B, S] (prefill of M-RoPE families): transformers' multimodal-rotary text
        models take them as position_ids (and expand [B, S] to 3 equal rows). decoder_kwargs go to
        the HF decoder as they are (families with more extra_inputs override this and translate)."""
        positions = rope_positions if rope_positions is not None else position_ids
        return self.decoder(lm)(inputs_embeds=inputs_embeds, position_ids=positions, use_cache=False,
                                **decoder_kwargs).last_hidden_state

    def moe_blocks(self, lm: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
        """(layer index, MoE block) for every routed-MoE layer; dense layers are skipped."""
        return [
            (i, layer.mlp)
            for i, layer in enumerate(self.decoder(lm).layers)
            if hasattr(layer.mlp, "experts") and hasattr(layer.mlp, "gate")
        ]

    def experts_modules(self, lm: torch.nn.Module) -> list[torch.nn.Module]:
        return [block.experts for _, block in self.moe_blocks(lm)]


def layer_of(module_path: str) -> int | None:
    m = LAYER_PATTERN.search(module_path)
    return int(m.group(1)) if m else None
