"""Vision-language models: what the compiler needs beyond the language backbone.

A VLM adapter (one file per family, e.g. internvl.py) says where the language
backbone and the vision tower + projector live in the HF model, and how a prompt
and images become token ids and pixel tiles. Every pass sees only the backbone,
as the same LoadedModel a text checkpoint gives; the vision encoder is exported
and lowered on its own, and the input side (prompt text, tiling, token expansion, layout) is
the family's front end in runtime/frontends/, which each adapter subclasses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..runtime.frontends import PLACEHOLDER, FrontEndFamily, chat_prompt  # noqa: F401  (re-exported)


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


class VLMFamily(FrontEndFamily):
    """The interface a VLM adapter implements, beyond its front end (FrontEndFamily: the input side,
    run by the engine). Methods take the HF config / processing objects, never an engine: the
    runtime stores the facts it needs in the manifest."""

    max_tiles: int = 256  # bound of the vision encoder's dynamic tile count
    native: bool = True  # transformers knows model_type (else the adapter reads the checkpoint: load_checkpoint)

    # --- loading -----------------------------------------------------------------
    def random_model(self, config, dtype) -> torch.nn.Module:
        """A randomly initialised VLM of this config (presets)."""
        from transformers import AutoModelForImageTextToText

        config.text_config._attn_implementation = config.vision_config._attn_implementation = "sdpa"
        return AutoModelForImageTextToText.from_config(config, dtype=dtype)

    def read_config(self, path: str):
        """Non-native families: the config of a checkpoint dir (its config.json alone), for a
        shape-only model on the meta device (registry.load_model(..., weights=False))."""
        raise NotImplementedError

    def load_checkpoint(self, path: str, dtype, device=None) -> tuple:
        """Non-native families: a checkpoint dir -> (model, tokenizer or None, image processor or None),
        its weights read straight into `dtype` on `device` (None: the checkpoint's, the CPU)."""
        raise NotImplementedError

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
