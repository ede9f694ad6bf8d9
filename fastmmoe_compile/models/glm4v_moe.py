"""GLM-4.5V (transformers `glm4v_moe`): a GLM-4.1V-style ViT (learned position table resampled
per image, 2D vision rotary, 2x2 conv downsample + SwiGLU merger) in front of a GLM-4.5-Air MoE.

Language backbone (`glm4v_moe_text`): GLM-4.5's routing (deepseek.py: sigmoid + correction bias,
group-limited top-k, renormalise, scale; shared experts; dense first layers), with 3D multimodal
rotary positions (temporal, height, width; mrope_section over the partial rotary dims). The
exported prefill takes them as the "rope_positions" input [3, B, S]. transformers has no
*ForCausalLM for it (grid_vlm.text_causal_lm_class). What it shares with Qwen3-VL (patch grids,
per-image encoder calls, 3D positions) is in grid_vlm.py.

Input side, as transformers' Glm4vProcessor does it (processing_glm4v.py):
- chat template: each image is <|begin_of_image|><|image|><|end_of_image|> in the user turn;
- Glm4vImageProcessor[Pil] resizes each image to a multiple of patch*merge and flattens it into
  patches [P, C*temporal*patch*patch] (the image repeated `temporal_patch_size` times), with its
  grid (t, h, w) in patches;
- expansion: the i-th <|image|> becomes t*h*w / merge^2 <|image|> tokens;
- positions (Glm4vMoeModel.get_rope_index): text tokens count up on all three axes; an image's
  tokens get (start, start + row, start + column) on its merged grid, and the text after it
  resumes at start + max(h, w) / merge.
"""
from __future__ import annotations

import dataclasses

import torch

from ..runtime.frontends.glm4v_moe import BEGIN, END, IMAGE, Glm4vFrontEnd, vision_tables  # noqa: F401
from ..runtime.frontends.glm4v_moe import INPUT_SPECS, ROPE_POSITIONS
from . import deepseek, grid_vlm


# --- language backbone ---------------------------------------------------------------
def causal_lm_class() -> type:
    from transformers.models.glm4v_moe import modeling_glm4v_moe as m

    return grid_vlm.text_causal_lm_class(m.Glm4vMoePreTrainedModel, m.Glm4vMoeTextModel, m.Glm4vMoeTextConfig)


def tiny_text_config():
    from transformers import Glm4vMoeTextConfig

    causal_lm_class()  # the text preset builds through AutoModelForCausalLM
    # 2 heads of 32: partial rotary 0.5 -> 16 rotary dims -> 8 frequencies, split t/h/w as 2/3/3.
    return Glm4vMoeTextConfig(
        vocab_size=288, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1, n_group=2, topk_group=1,
        routed_scaling_factor=1.5, norm_topk_prob=True, max_position_embeddings=4096, initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "mrope_section": [2, 3, 3]},
        tie_word_embeddings=False,
    )


# GLM-4.5's routing facts (one place: deepseek.py), plus the 3D rotary positions as a prefill input.
TEXT_FAMILY = dataclasses.replace(deepseek._sigmoid_routed("glm4v_moe_text", tiny_text_config),
                                  input_specs=INPUT_SPECS, decoder_keywords=((ROPE_POSITIONS.name, "position_ids"),))


# --- vision encoder --------------------------------------------------------------------
class Encoder(torch.nn.Module):
    """One image: patches [P, C*t*p*p] + its tables -> merged features [P / merge^2, H_text].

    HF's own Glm4vMoeVisionModel, fed the tables it would compute from grid_thw
    (vision_utils: rotary position ids, cu_seqlens), so nothing grid-dependent is traced; the
    grid itself goes in as data (the position table's resampling reads h and w as numbers).
    """

    def __init__(self, model):
        super().__init__()
        self.visual = model.model.visual

    def forward(self, pixel_values, grid_thw, position_ids, cu_seqlens):
        pixel_values = pixel_values.to(self.visual.dtype)
        return self.visual(pixel_values, grid_thw=grid_thw, position_ids=position_ids,
                           cu_seqlens=cu_seqlens).pooler_output


class Glm4vMoeFamily(Glm4vFrontEnd, grid_vlm.GridVLMFamily):
    min_merged_tokens = 2  # the exported encoder's smallest image (GLM's processor minimum is far above)

    def text_causal_lm(self) -> type:
        return causal_lm_class()

    def encoder(self, model) -> torch.nn.Module:
        return Encoder(model).eval()


FAMILY = Glm4vMoeFamily()


# --- built-in models --------------------------------------------------------------
_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
             "<|assistant|>", "<|observation|>", BEGIN, END, "<|begin_of_video|>", "<|end_of_video|>", IMAGE,
             "<|video|>"]

# GLM-4.5V's template, reduced to what a prompt with images needs (no tools, no thinking switches).
CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|begin_of_image|><|image|><|end_of_image|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def tiny_config():
    from transformers import Glm4vMoeConfig
    from transformers.models.glm4v_moe.configuration_glm4v_moe import Glm4vMoeVisionConfig

    text = tiny_text_config()
    # 4 px patches, 2x2 merge; a 32 px (8x8) position table resampled to each image's grid.
    vision = Glm4vMoeVisionConfig(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                                  image_size=32, patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                                  initializer_range=0.1)
    ids = {name: _SPECIALS.index(token) + 256 for name, token in [
        ("image_token_id", IMAGE), ("video_token_id", "<|video|>"), ("image_start_token_id", BEGIN),
        ("image_end_token_id", END), ("video_start_token_id", "<|begin_of_video|>"),
        ("video_end_token_id", "<|end_of_video|>")]}
    return Glm4vMoeConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **ids)


def tiny_processing():
    """A real tokenizer (byte-level BPE over 256 byte symbols, no merges, plus GLM-4.5V's special
    tokens and chat template) and image processor, save_pretrained-able like a checkpoint's."""
    from transformers import Glm4vImageProcessorPil

    from .vlm import byte_level_tokenizer

    tokenizer = byte_level_tokenizer(
        _SPECIALS, eos_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE,
        extra_special_tokens={"image_token": IMAGE, "video_token": "<|video|>"},
    )
    # Images resized to multiples of 8 px (patch 4 x merge 2), between 16x16 and 48x48 pixels' worth.
    image_processor = Glm4vImageProcessorPil(size={"shortest_edge": 16 * 16, "longest_edge": 48 * 48},
                                             patch_size=4, temporal_patch_size=2, merge_size=2)
    return tokenizer, image_processor
