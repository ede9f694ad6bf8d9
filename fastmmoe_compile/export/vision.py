"""torch.export of a VLM's vision encoder + projector, with a dynamic tile count.

    (pixel_values [T, 3, h, w]) -> image features [T, tokens_per_tile, H_text]

The tile size is fixed by the model; T (tiles of every image of a prompt, thumbnails
included) is dynamic up to the family's max_tiles. No pass touches this graph: it is
lowered as it is, next to the backbone.
"""
from __future__ import annotations

import torch
from torch.export import Dim, ExportedProgram

from ..models.registry import LoadedModel

INPUT_NAMES = ("pixel_values",)


def export_vision(loaded: LoadedModel) -> ExportedProgram:
    vision = loaded.vision
    if vision is None:
        raise ValueError(f"{loaded.source} has no vision encoder")
    encoder = vision.encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    param = next(encoder.parameters())
    height, width = vision.describe()["image_size"]
    example = torch.zeros(2, 3, height, width, dtype=param.dtype, device=param.device)
    tiles = Dim("T", min=1, max=vision.family.max_tiles)
    with torch.no_grad():
        return torch.export.export(encoder, (example,), dynamic_shapes={"pixel_values": {0: tiles}}, strict=False)
