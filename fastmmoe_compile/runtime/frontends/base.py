"""The front-end interface of a VLM family, and its registry."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...errors import UserInputError
from ..specs import InputSpec

# Prompts mark each image's place with PLACEHOLDER, whatever the family's own token
# (InternVL's <IMG_CONTEXT>, Qwen-VL's <|image_pad|>, ...): the front end translates.
PLACEHOLDER = "<image>"


class FrontEndFamily:
    """Images + prompt -> the backbone's inputs, for one VLM family. Methods take the processing
    objects saved in the engine dir and the manifest's vision facts, never the HF model."""

    model_type: str  # the VLM's config.model_type, the manifest's vision.family

    def load_processing(self, path) -> tuple:
        """(tokenizer, image processor) saved in an engine's processor dir."""
        from transformers import AutoImageProcessor, AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path)), AutoImageProcessor.from_pretrained(str(path))

    def prompt_text(self, tokenizer, prompt: str, chat: bool) -> str:
        """The user's prompt, PLACEHOLDER per image, as the model's text with one image token per image."""
        raise NotImplementedError

    def tiles(self, image_processor, images: list) -> tuple:
        """(pixel tiles [T, 3, h, w], tiles per image), plus optionally a third item: each image's layout
        (e.g. its tile grid) for expand and arrange when the tile count alone does not say it.
        Called once per prompt, with that prompt's images."""
        raise NotImplementedError

    def expand(self, tokenizer, text: str, layouts: list, facts: dict) -> str:
        """Each image token -> the model's full token run for that image (layouts: tiles per image,
        or tiles()'s third item)."""
        raise NotImplementedError

    def encode(self, encoder, pixel_values, layouts: list, facts: dict) -> list:
        """Run the engine's compiled vision encoder on the pixel inputs of a batch (tiles()'s first
        items, concatenated over prompts; layouts: every image's, in order) -> its outputs, a list.
        Default: one call on all tiles."""
        outputs = encoder(pixel_values.contiguous())
        return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]

    def arrange(self, outputs: list, layouts: list, facts: dict) -> torch.Tensor:
        """The vision encoder's outputs -> the image-token embeddings [N, H] in prompt order.
        Default: the features [T, tokens_per_tile, H], tile by tile."""
        features = outputs[0]
        return features.reshape(-1, features.shape[-1])

    def sample_input(self, spec: InputSpec, prompts: PromptBatch, i: int) -> torch.Tensor:
        """Sample i's value of the backbone's extra input `spec` (its shape without the B dim), for
        families whose backbone takes extra inputs (runtime/specs.py); they override this."""
        raise PromptError(f"the {self.model_type} front end cannot build the backbone input {spec.name!r}")


@dataclass
class PromptBatch:
    """The prompts of one prepare() call, as a front end builds the backbone's extra inputs from them."""

    ids: list  # per sample: input_ids [S] int64
    masks: list  # per sample: [S] bool, True at the image tokens
    embeds: list  # per sample: inputs_embeds [S, H] (image features in place)
    layouts: list  # per sample: its images' layouts (tiles()'s third item, or tiles per image)
    all_layouts: list  # every image's layout, in prompt order (encode's and arrange's argument)
    outputs: list | None  # the vision encoder's outputs for all the images (None: no image)
    facts: dict  # the manifest's vision facts
    model: dict  # the manifest's model facts (InputSpec.sizes name them)
    dtype: torch.dtype  # the engine's floating dtype
    cache: dict = field(default_factory=dict)  # values computed once per batch, by the front end

    def offset(self, i: int) -> int:
        """Image tokens of the samples before sample i (where sample i's start in image-token order)."""
        return sum(int(m.sum()) for m in self.masks[:i])

    def at_image_tokens(self, spec: InputSpec, values: torch.Tensor, i: int) -> torch.Tensor:
        """Sample i's value of `spec`: `values` (one row per image token of the batch, in prompt
        order, along the spec's S axis) at its image-token positions, the absent value elsewhere."""
        seq = self.ids[i].shape[0]
        out = spec.absent_value(None, seq, self.model, self.embeds[i].dtype).to(self.embeds[i].device)
        n, start = int(self.masks[i].sum()), self.offset(i)
        if n:
            axis = spec.sequence_axis - (spec.batch_axis < spec.sequence_axis)
            index = [slice(None)] * out.dim()
            index[axis] = self.masks[i]
            out[tuple(index)] = values.narrow(axis, start, n)
        return out


FRONT_ENDS: dict[str, FrontEndFamily] = {}


def register(family: FrontEndFamily) -> FrontEndFamily:
    """Run engines whose manifest says vision.family == family.model_type with `family`."""
    FRONT_ENDS[family.model_type] = family
    return family


class PromptError(UserInputError):
    """A prompt this engine's input side cannot take (bad input)."""


def chat_prompt(tokenizer, prompt: str, chat: bool, image_text: str) -> str:
    """The user's prompt (PLACEHOLDER per image) as the model's text: through the tokenizer's chat
    template as one user turn with image entries (chat=True), or raw with image_text per image."""
    if not chat:
        return prompt.replace(PLACEHOLDER, image_text)
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError("this model's tokenizer has no chat template; pass chat=False (run: --no-chat) "
                               "and a raw prompt")
    content = []
    for i, part in enumerate(prompt.split(PLACEHOLDER)):
        if i:
            content.append({"type": "image"})
        if part:
            content.append({"type": "text", "text": part})
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
