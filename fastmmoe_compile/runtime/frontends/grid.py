"""Front end of VLMs that take images as patch grids (Qwen3-VL, GLM-4.5V): one encoder call per
image with its grid tables, image-token runs sized by the merged grid, 3D rotary positions."""
from __future__ import annotations

import torch

from ..specs import InputSpec, register_input
from .base import FrontEndFamily, PromptBatch, chat_prompt

# The 3D (temporal, height, width) rotary position of every token, computed on the host from the
# ids and the image grids (rope_index); decode continues after the largest (transformers' rope deltas).
ROPE_POSITIONS = register_input(InputSpec(
    "rope_positions", (3, "B", "S"), "int64", absent="arange", decode="max+1",
    doc="multimodal rotary positions (temporal, height, width) of each token"))


def rope_index(input_ids: torch.Tensor, grids: list, image_token_id: int, merge: int) -> torch.Tensor:
    """One sample's 3D rotary positions [3, S], as HF's get_rope_index (Qwen3-VL, GLM-4.5V) computes
    them (the engine continues decoding at their max + 1): text tokens advance all three axes by one;
    each run of image tokens is one image, whose tokens take (start + t', start + h', start + w')
    over its merged grid, and the text after it resumes at start + max(h, w) / merge."""
    ids = input_ids.tolist()
    columns, position, image, i = [], 0, 0, 0
    while i < len(ids):
        j = i
        while j < len(ids) and (ids[j] == image_token_id) == (ids[i] == image_token_id):
            j += 1
        if ids[i] != image_token_id:
            columns.append(torch.arange(position, position + j - i).expand(3, -1))
            position += j - i
        else:
            if image >= len(grids):
                raise ValueError(f"more image-token runs in the prompt than its {len(grids)} image(s)")
            t, h, w = grids[image][0], grids[image][1] // merge, grids[image][2] // merge
            if t * h * w != j - i:
                raise ValueError(f"image {image}: {j - i} image tokens for a {t}x{h}x{w} merged grid")
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            columns.append(torch.stack([tt, hh, ww]).reshape(3, -1) + position)
            position += max(h, w)
            image += 1
        i = j
    if image != len(grids):
        raise ValueError(f"{image} image-token runs in the prompt for {len(grids)} image(s)")
    return torch.cat(columns, dim=1).to(torch.long) if columns else torch.zeros(3, 0, dtype=torch.long)


class GridFrontEnd(FrontEndFamily):
    """Subclasses say how the image is written in the chat (image_text, image_token) and how the
    encoder is fed (grid_inputs, output_token_dims)."""

    image_text: str  # what the chat template writes for one image, e.g. <|vision_start|><|image_pad|><|vision_end|>
    image_token: str  # the token that expand() repeats
    max_patches = 1 << 16  # patches of one image the exported encoder takes
    output_token_dims: tuple[int, ...] = (0,)  # per encoder output, its token dimension

    def merge_size(self, facts: dict) -> int:
        return int(facts["spatial_merge_size"])

    def grid_inputs(self, grid, facts: dict) -> tuple:
        """One image's grid (t, h, w) -> the encoder's inputs after its patches."""
        raise NotImplementedError

    def prompt_text(self, tokenizer, prompt: str, chat: bool) -> str:
        return chat_prompt(tokenizer, prompt, chat, self.image_text)

    def tiles(self, image_processor, images: list) -> tuple:
        """(patches [sum P, C*T*ps*ps], one "tile" per image, each image's (t, h, w) patch grid)."""
        out = image_processor(images=images, return_tensors="pt")
        grids = [[int(x) for x in g] for g in out["image_grid_thw"].tolist()]
        return out["pixel_values"], [1] * len(grids), grids

    def image_tokens(self, grid, facts: dict) -> int:
        t, h, w = grid
        return t * h * w // self.merge_size(facts) ** 2

    def expand(self, tokenizer, text: str, grids: list, facts: dict) -> str:
        parts = text.split(self.image_token)
        if len(parts) - 1 != len(grids):
            raise ValueError(f"the prompt has {len(parts) - 1} {self.image_token} tokens for {len(grids)} images")
        return parts[0] + "".join(self.image_token * self.image_tokens(g, facts) + part
                                  for g, part in zip(grids, parts[1:]))

    def encode(self, encoder, pixel_values, grids: list, facts: dict) -> list:
        """One encoder call per image (its patches and grid tables); each output concatenated over images."""
        per_image, start = [], 0
        for grid in grids:
            count = grid[0] * grid[1] * grid[2]
            if count > self.max_patches:
                raise ValueError(f"an image of {count} patches; this engine's vision encoder takes at most "
                                 f"{self.max_patches}: pass a smaller image")
            out = encoder(pixel_values[start:start + count].contiguous(),
                          *(x.contiguous() for x in self.grid_inputs(grid, facts)))
            per_image.append(list(out) if isinstance(out, (tuple, list)) else [out])
            start += count
        if start != pixel_values.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} patches for image grids of {start}")
        return [torch.cat([o[i] for o in per_image], dim=d) for i, d in enumerate(self.output_token_dims)]

    def arrange(self, outputs: list, grids: list, facts: dict) -> torch.Tensor:
        return outputs[0]  # merged patch groups, image by image: prompt order

    def rope_positions(self, input_ids: torch.Tensor, grids: list, facts: dict) -> torch.Tensor:
        return rope_index(input_ids, grids, int(facts["image_token_id"]), self.merge_size(facts))

    def sample_input(self, spec: InputSpec, prompts: PromptBatch, i: int) -> torch.Tensor:
        if spec.name == ROPE_POSITIONS.name:  # [3, S]
            return self.rope_positions(prompts.ids[i], prompts.layouts[i], prompts.facts)
        return super().sample_input(spec, prompts, i)
