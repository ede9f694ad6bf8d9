"""Vision-language models: what the compiler needs beyond the language backbone.

A VLM adapter (one file per family, e.g. internvl.py) says where the language
backbone and the vision tower + projector live in the HF model, and how a prompt
and images become token ids and pixel tiles. Every pass sees only the backbone,
as the same LoadedModel a text checkpoint gives; the vision encoder is exported
and lowered on its own, and the input side runs in runtime/multimodal.py.

Prompts mark each image's place with PLACEHOLDER, whatever the family's own token
(InternVL's <IMG_CONTEXT>, Qwen-VL's <|image_pad|>, ...): the adapter translates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

PLACEHOLDER = "<image>"


@dataclass
class VisionParts:
    """The vision side of a loaded VLM, next to LoadedModel.lm (its language backbone)."""

    family: "VLMFamily"
    model: torch.nn.Module  # the whole HF VLM (tests compare with its forward)
    encoder: torch.nn.Module  # pixel tiles [T, 3, h, w] -> projected features [T, tokens_per_tile, H_text]
    tokenizer: Any = None  # None for an in-memory model given without them
    image_processor: Any = None

    def describe(self) -> dict:
        return {"family": self.family.model_type, "max_tiles": self.family.max_tiles,
                **self.family.vision_facts(self.model.config)}


class VLMFamily:
    """The interface a VLM adapter implements. Methods take the HF config / processing objects,
    never an engine: the runtime stores the facts it needs in the manifest."""

    model_type: str  # the VLM's config.model_type, e.g. "internvl"
    max_tiles: int = 256  # bound of the vision encoder's dynamic tile count
    native: bool = True  # transformers knows model_type (else the adapter reads the checkpoint: load_checkpoint)

    # --- loading -----------------------------------------------------------------
    def random_model(self, config, dtype) -> torch.nn.Module:
        """A randomly initialised VLM of this config (presets)."""
        from transformers import AutoModelForImageTextToText

        config.text_config._attn_implementation = config.vision_config._attn_implementation = "sdpa"
        return AutoModelForImageTextToText.from_config(config, dtype=dtype)

    def load_checkpoint(self, path: str, dtype) -> tuple:
        """Non-native families: a checkpoint dir -> (model, tokenizer or None, image processor or None)."""
        raise NotImplementedError

    def load_processing(self, path) -> tuple:
        """(tokenizer, image processor) saved in an engine's processor dir."""
        from transformers import AutoImageProcessor, AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path)), AutoImageProcessor.from_pretrained(str(path))

    # --- model side --------------------------------------------------------------
    def text_config(self, config):
        raise NotImplementedError

    def causal_lm(self, model) -> torch.nn.Module:
        """The language backbone as a *ForCausalLM sharing the VLM's modules (no copies)."""
        raise NotImplementedError

    def encoder(self, model) -> torch.nn.Module:
        raise NotImplementedError

    def vision_facts(self, config) -> dict:
        """JSON facts the runtime needs: tile size, tokens_per_tile, image_token_id, ..."""
        raise NotImplementedError

    # --- input side (runs in the engine, from the files saved beside it) -----------
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

    def deepstack(self, outputs: list, layouts: list, facts: dict) -> torch.Tensor | None:
        """Families whose backbone takes "deepstack": the per-layer visual features [D, N, H] of the
        image tokens, in prompt order (the runtime places them at the image-token positions)."""
        return None

    def rope_positions(self, input_ids: torch.Tensor, layouts: list, facts: dict) -> torch.Tensor:
        """Families whose backbone takes "rope_positions": one sample's input_ids [S] and its images'
        layouts (none for a text-only prompt) -> its [3, S] int64 rotary positions."""
        raise NotImplementedError

    # --- export of the vision encoder (export/vision.py) ----------------------------------
    def vision_export_inputs(self, encoder: torch.nn.Module, facts: dict) -> tuple[tuple, dict]:
        """(example args, dynamic_shapes) for torch.export of the encoder. Default: pixel tiles
        [T, 3, h, w] with a dynamic tile count T."""
        from torch.export import Dim

        param = next(encoder.parameters())
        height, width = facts["image_size"]
        example = torch.zeros(2, 3, height, width, dtype=param.dtype, device=param.device)
        return (example,), {"pixel_values": {0: Dim("T", min=1, max=self.max_tiles)}}

    def export_context(self):
        """A context manager around the encoder's torch.export (e.g. transformers' export patches)."""
        import contextlib

        return contextlib.nullcontext()


def chat_prompt(tokenizer, prompt: str, chat: bool, image_text: str) -> str:
    """The user's prompt (PLACEHOLDER per image) as the model's text: through the tokenizer's chat
    template as one user turn with image entries (chat=True), or raw with image_text per image."""
    if not chat:
        return prompt.replace(PLACEHOLDER, image_text)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; pass chat=False and a raw prompt")
    content = []
    for i, part in enumerate(prompt.split(PLACEHOLDER)):
        if i:
            content.append({"type": "image"})
        if part:
            content.append({"type": "text", "text": part})
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def byte_level_tokenizer(specials: list[str], **kwargs):
    """A real tokenizer for tiny presets: byte-level BPE over the 256 byte symbols (no merges), then
    `specials` as ids 256, 257, ...; kwargs go to PreTrainedTokenizerFast (eos_token, chat_template, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    if "post_processor" in kwargs:
        backend.post_processor = kwargs.pop("post_processor")
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def share_modules(shell: torch.nn.Module, **modules: torch.nn.Module) -> torch.nn.Module:
    """Put the VLM's own modules into a *ForCausalLM built on the meta device (so nothing is copied)."""
    for name, module in modules.items():
        setattr(shell, name, module)
    left = [n for n, p in shell.named_parameters() if p.device.type == "meta"]
    device = next(iter(modules.values())).parameters().__next__().device
    if left and device.type != "meta":
        raise RuntimeError(f"backbone shell still has meta parameters: {left[:3]}")
    return shell
