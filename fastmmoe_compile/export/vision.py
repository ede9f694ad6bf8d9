"""torch.export of a VLM's vision encoder + projector, with a dynamic tile count.

    (pixel_values [T, 3, h, w]) -> image features [T, tokens_per_tile, H_text]

The tile size is fixed by the model; T (tiles of every image of a prompt, thumbnails
included) is dynamic up to the family's max_tiles. Families with other encoder inputs
(Qwen3-VL: patches of one image + precomputed grid tables) say so through
VLMFamily.vision_export_inputs. No pass touches this graph: it is lowered as it is,
next to the backbone.
"""
from __future__ import annotations

import torch
from torch.export import ExportedProgram

from ..models.families import LoadedModel
from ..transformers_compat import frozen_for_export, sdpa_attention

INPUT_NAMES = ("pixel_values",)


def export_vision(loaded: LoadedModel) -> ExportedProgram:
    vision = loaded.vision
    if vision is None:
        raise ValueError(f"{loaded.source} has no vision encoder")
    encoder = vision.encoder
    with torch.no_grad(), frozen_for_export(encoder), sdpa_attention(vision.model), vision.family.export_context():
        args, dynamic = vision.family.vision_export_inputs(encoder, vision.describe())
        return torch.export.export(encoder, args, dynamic_shapes=dynamic, strict=False)
