"""Qwen3-VL-MoE's front end: a grid VLM whose encoder also returns deepstack features [D, N, H]."""
from __future__ import annotations

import torch

from ..specs import InputSpec, register_input
from .base import PromptBatch, register
from .grid import ROPE_POSITIONS, GridFrontEnd

VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
IMAGE_RUN = VISION_START + IMAGE_PAD + VISION_END

# The vision tower's intermediate features, added to the residual stream after decoder layers
# 0..D-1 at the image-token positions, zero elsewhere (D = len(vision_config.deepstack_visual_indexes)).
DEEPSTACK = register_input(InputSpec(
    "deepstack", ("D", "B", "S", "H"), "float", sizes=(("D", "deepstack_layers"), ("H", "hidden_size")),
    absent="zeros", doc="deepstack visual features per decoder layer 0..D-1, zero at text tokens"))
INPUT_SPECS = (ROPE_POSITIONS, DEEPSTACK)  # the backbone's extra inputs, in this order


def grid_tables(grid, facts: dict, dtype=torch.float32) -> tuple:
    """One image's (t, h, w) patch grid -> the encoder's grid inputs, with transformers' own helpers
    (what Qwen3VLMoeVisionModel.forward computes from grid_thw)."""
    from transformers.vision_utils import (
        get_vision_cu_seqlens,
        get_vision_interpolation_indices_and_weights,
        get_vision_position_ids,
    )

    grid_thw = torch.tensor([list(grid)], dtype=torch.long)
    merge = int(facts["spatial_merge_size"])
    indices, weights = get_vision_interpolation_indices_and_weights(
        grid_thw, num_grid_per_side=int(facts["num_grid_per_side"]), mode="bilinear", align_corners=True,
        spatial_merge_size=merge)  # Qwen3VLMoeVisionModel's interpolation_mode / _align_corners
    return indices, weights.to(dtype), get_vision_position_ids(grid_thw, merge), get_vision_cu_seqlens(grid_thw)


class Qwen3VLFrontEnd(GridFrontEnd):
    model_type = "qwen3_vl_moe"
    image_text, image_token = IMAGE_RUN, IMAGE_PAD
    max_patches = 65536  # patches of one image: Qwen3-VL's processor allows 16777216 px of 16 px patches
    output_token_dims = (0, 1)  # pooled [N, H], deepstack [D, N, H]

    def grid_inputs(self, grid, facts: dict) -> tuple:
        return grid_tables(grid, facts)

    def deepstack(self, outputs: list, grids: list, facts: dict) -> torch.Tensor:
        return outputs[1]

    def sample_input(self, spec: InputSpec, prompts: PromptBatch, i: int) -> torch.Tensor:
        if spec.name == DEEPSTACK.name:  # [D, S, H]: the image tokens' features in place, zero elsewhere
            if prompts.outputs is None:
                return prompts.at_image_tokens(spec, None, i)
            if spec.name not in prompts.cache:  # [D, N, H] for every image token of the batch
                features = self.deepstack(prompts.outputs, prompts.all_layouts, prompts.facts)
                prompts.cache[spec.name] = features.to(prompts.dtype)
            return prompts.at_image_tokens(spec, prompts.cache[spec.name], i)
        return super().sample_input(spec, prompts, i)


register(Qwen3VLFrontEnd())
