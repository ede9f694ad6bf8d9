"""GLM-4.5V's front end: a grid VLM whose encoder takes the grid itself plus its tables."""
from __future__ import annotations

import torch

from .base import register
from .grid import ROPE_POSITIONS, GridFrontEnd

BEGIN, IMAGE, END = "<|begin_of_image|>", "<|image|>", "<|end_of_image|>"
INPUT_SPECS = (ROPE_POSITIONS,)  # the backbone's extra inputs: 3D rotary positions


def vision_tables(grid, merge: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's grid (t, h, w) -> (grid_thw [1, 3], rotary position ids [P, 2], cu_seqlens [t + 1])."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

    grid_thw = torch.tensor([list(grid)], dtype=torch.long)
    return grid_thw, get_vision_position_ids(grid_thw, merge), get_vision_cu_seqlens(grid_thw)


class Glm4vFrontEnd(GridFrontEnd):
    model_type = "glm4v_moe"
    image_text, image_token = f"{BEGIN}{IMAGE}{END}", IMAGE
    max_patches = 1 << 16  # GLM-4.5V's processor: up to 60000

    def grid_inputs(self, grid, facts: dict) -> tuple:
        return vision_tables(grid, self.merge_size(facts))


register(Glm4vFrontEnd())
