"""Qwen3-VL-MoE's front end: a grid VLM whose encoder also returns deepstack features [D, N, H]."""
from __future__ import annotations

import torch

from .base import register
from .grid import GridFrontEnd

VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
IMAGE_RUN = VISION_START + IMAGE_PAD + VISION_END


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


register(Qwen3VLFrontEnd())
