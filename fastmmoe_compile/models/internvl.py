"""InternVL (transformers `internvl`, InternVL3.5-*-HF): InternViT + pixel-shuffle MLP projector
in front of a Qwen3-MoE (30B-A3B) language model.

Input side, as transformers' InternVLProcessor does it (processing_internvl.py), without
constructing that class (it owns a video processor, which needs torchvision):
- chat template: each image becomes one <IMG_CONTEXT> in the user turn;
- tiles: the image processor (GotOcr2ImageProcessor[Pil]) with crop_to_patches=True cuts the
  image into the grid closest to its aspect ratio, plus a thumbnail when there is more than one tile;
- expansion: the i-th <IMG_CONTEXT> becomes <img> + <IMG_CONTEXT> x (tokens_per_tile x tiles) + </img>.
"""
from __future__ import annotations

import copy

import torch

from ..runtime.frontends.internvl import CONTEXT, END, START, InternVLFrontEnd
from .vlm import VLMFamily, byte_level_tokenizer

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class Encoder(torch.nn.Module):
    """pixel tiles [T, 3, h, w] -> projected features [T, tokens_per_tile, H_text], HF's own code.

    Only the vision tower and projector are submodules (so only their weights are exported);
    get_image_features is held as a function, as export/capture.Backbone holds the decoder.
    """

    def __init__(self, model):
        super().__init__()
        self.vision_tower = model.model.vision_tower
        self.multi_modal_projector = model.model.multi_modal_projector
        self._features = model.model.get_image_features

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._features(pixel_values=pixel_values, return_dict=True).pooler_output


class InternVLFamily(InternVLFrontEnd, VLMFamily):

    def text_config(self, config):
        return config.text_config

    def causal_lm(self, model) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        from .vlm import share_modules

        language_model = model.model.language_model
        with torch.device("meta"):
            # A copy: building a model sets the attention implementation on its config, and this one is the user's.
            shell = AutoModelForCausalLM.from_config(copy.deepcopy(language_model.config))
        shell = share_modules(shell, model=language_model, lm_head=model.lm_head)
        shell.config = language_model.config  # one config object: implementation switches reach the layers
        return shell.eval()

    def encoder(self, model) -> torch.nn.Module:
        return Encoder(model).eval()

    def vision_facts(self, config) -> dict:
        v = config.vision_config
        height, width = (int(x) for x in v.image_size)
        patch_h, patch_w = (int(x) for x in v.patch_size)
        patches = (height // patch_h) * (width // patch_w)
        return {
            "image_size": [height, width],
            "tokens_per_tile": int(patches * config.downsample_ratio ** 2),
            "image_token_id": int(config.image_token_id),
        }


FAMILY = InternVLFamily()


# --- built-in models --------------------------------------------------------------
def tiny_config():
    from transformers import InternVLConfig
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    from .qwen3_moe import tiny_config as tiny_text

    text = tiny_text()
    text.vocab_size = 288  # 256 bytes + InternVL's special tokens (tiny_processing), padded
    vision = InternVLVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  image_size=112, patch_size=14, initializer_range=0.1)
    # 112 px tiles, 14 px patches: 64 patches, pixel-shuffled by 0.5 to 16 tokens per tile.
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=_SPECIALS.index(CONTEXT) + 256,
                          image_seq_length=16, tie_word_embeddings=False)


_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", START, END, CONTEXT, "<video>"]


def tiny_processing(max_patches: int = 6):
    """A real tokenizer (byte-level BPE over 256 byte symbols, no merges, plus InternVL's special
    tokens and a chat template) and image processor, save_pretrained-able like a checkpoint's."""
    from transformers import GotOcr2ImageProcessorPil

    tokenizer = byte_level_tokenizer(
        _SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE,
        extra_special_tokens={"start_image_token": START, "end_image_token": END, "context_image_token": CONTEXT,
                              "video_token": "<video>"},
    )
    image_processor = GotOcr2ImageProcessorPil(size={"height": 112, "width": 112}, crop_to_patches=True,
                                            max_patches=max_patches)
    return tokenizer, image_processor
