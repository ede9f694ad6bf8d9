"""InternVL's front end: 448 px tiles, each image as <img> + tokens_per_tile x tiles <IMG_CONTEXT> + </img>."""
from __future__ import annotations

import torch

from .base import FrontEndFamily, chat_prompt, register

# InternVL's special tokens (tokenizer_config of the -HF checkpoints), used when a tokenizer lacks the attributes.
START, END, CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"


class InternVLFrontEnd(FrontEndFamily):
    model_type = "internvl"

    @staticmethod
    def tokens(tokenizer) -> tuple[str, str, str]:
        return (getattr(tokenizer, "start_image_token", None) or START,
                getattr(tokenizer, "end_image_token", None) or END,
                getattr(tokenizer, "context_image_token", None) or CONTEXT)

    def prompt_text(self, tokenizer, prompt: str, chat: bool) -> str:
        return chat_prompt(tokenizer, prompt, chat, self.tokens(tokenizer)[2])

    def tiles(self, image_processor, images: list) -> tuple[torch.Tensor, list[int]]:
        out = image_processor(images=images, crop_to_patches=True, return_tensors="pt")
        return out["pixel_values"], [int(n) for n in out["num_patches"]]

    def expand(self, tokenizer, text: str, tiles_per_image: list[int], facts: dict) -> str:
        start, end, context = self.tokens(tokenizer)
        parts = text.split(context)
        if len(parts) - 1 != len(tiles_per_image):
            raise ValueError(f"the prompt has {len(parts) - 1} image tokens for {len(tiles_per_image)} images")
        runs = [f"{start}{context * (facts['tokens_per_tile'] * n)}{end}" for n in tiles_per_image]
        return parts[0] + "".join(run + part for run, part in zip(runs, parts[1:]))


register(InternVLFrontEnd())
