"""Qwen3-VL-MoE (transformers `qwen3_vl_moe`, Qwen3-VL-30B-A3B / 235B-A22B): a ViT with 2D rotary
and DeepStack mergers in front of a Qwen3-MoE-style language model with 3D (interleaved M-RoPE)
rotary positions.

What this family needs beyond InternVL:
- Backbone inputs (MoEFamily.extra_inputs): `rope_positions` [3, B, S], the (temporal, height,
  width) rotary position of every token, computed on the host from input_ids and the image grids
  exactly as HF's Qwen3VLMoeModel.get_rope_index does (rope_positions() below); decode continues
  at max position + 1 (HF's rope delta). And `deepstack` [D, B, S, H]: the vision tower's
  intermediate features (D = len(vision_config.deepstack_visual_indexes)), added to the residual
  stream after decoder layers 0..D-1 at the image-token positions, zero elsewhere.
- Token reduction and deepstack: `deepstack` is sequence-indexed, so a merge / FastV stage at a
  layer l < D gathers it with the kept tokens like every other sequence-indexed value: a kept
  token gets its OWN position's deepstack feature, a merged token the one of its window's first
  token (the position it takes); the features of dropped tokens are dropped. The 3D positions
  follow the kept tokens the same way (computed on the full sequence, then gathered).
- No boolean-mask indexing in the exported graph: HF's `_deepstack_process` does
  `hidden[visual_pos_masks] += feature`; with `deepstack` already S-indexed and zero at text
  positions that is `hidden + deepstack[l]` (additive_deepstack, installed only for the call).
- Vision encoder: one image per call (patches [P, C*T*ps*ps]), with the grid-dependent tables
  (position-embedding interpolation taps/weights, 2D rotary ids, cu_seqlens) precomputed on the
  host by transformers.vision_utils, and transformers' export patches (reshape-into-batch SDPA
  for the packed vision attention) while exporting. Images of any size share one program.
- Input side, as Qwen3VLProcessor does it (that class needs a video processor, hence
  torchvision): chat template puts <|vision_start|><|image_pad|><|vision_end|> per image; the image
  processor (Qwen2VLImageProcessor[Pil]) resizes to a multiple of patch*merge and returns patches +
  image_grid_thw; each <|image_pad|> expands to t*h*w / merge^2 copies.
- transformers has no *ForCausalLM for `qwen3_vl_moe_text` (grid_vlm.text_causal_lm_class).
What it shares with GLM-4.5V (patch grids, per-image encoder calls, 3D positions) is in grid_vlm.py.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..runtime.frontends.qwen3_vl_moe import IMAGE_PAD, INPUT_SPECS, ROPE_POSITIONS, VISION_END, VISION_START
from ..runtime.frontends.qwen3_vl_moe import Qwen3VLFrontEnd
from ..runtime.frontends.qwen3_vl_moe import grid_tables  # noqa: F401  (re-exported)
from . import grid_vlm
from .base import MoEFamily
DEEPSTACK_ATTR = "fastmmoe_deepstack_layers"  # D, copied onto the text config (the fact lives in vision_config)

# Qwen3-VL's chat template, restricted to what a prompt of text and images uses.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# --- language backbone -----------------------------------------------------------------
def text_causal_lm_class() -> type:
    from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as m

    return grid_vlm.text_causal_lm_class(m.Qwen3VLMoePreTrainedModel, m.Qwen3VLMoeTextModel, m.Qwen3VLMoeTextConfig)


@contextlib.contextmanager
def additive_deepstack(decoder: torch.nn.Module):
    """For the duration, the decoder's deepstack step is `hidden + feature` on S-indexed features
    (zero at text positions) instead of HF's boolean-mask scatter, which torch.export cannot take
    with a dynamic sequence. Only this instance is patched, and only while the block runs."""
    had = "_deepstack_process" in decoder.__dict__
    old = decoder.__dict__.get("_deepstack_process")
    decoder._deepstack_process = lambda hidden, _mask, feature: hidden + feature.to(hidden.dtype)
    try:
        yield
    finally:
        if had:
            decoder._deepstack_process = old
        else:
            del decoder._deepstack_process


def text_tiny_config():
    """4-layer hidden-64 text model, 8 experts top-4; mrope_section [4, 2, 2] over head_dim/2 = 8
    rotary frequencies, so temporal, height and width positions all reach attention."""
    from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig

    text_causal_lm_class()  # presets build the model with AutoModelForCausalLM
    config = Qwen3VLMoeTextConfig(
        vocab_size=272, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=4,
        max_position_embeddings=4096, initializer_range=0.1, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                         "mrope_interleaved": True},
    )
    setattr(config, DEEPSTACK_ATTR, 0)  # a text-only model has no deepstack features
    return config


@dataclass(frozen=True)
class Qwen3VLMoeTextFamily(MoEFamily):
    """The language model: routed like qwen3_moe, plus 3D rotary positions and deepstack inputs."""

    def deepstack_layers(self, config) -> int:
        return int(getattr(config, DEEPSTACK_ATTR, 0))

    def input_facts(self, config) -> dict:
        return {"deepstack_layers": self.deepstack_layers(config)}  # D of DEEPSTACK's sizes

    def run_decoder(self, lm, inputs_embeds, position_ids=None, rope_positions=None, deepstack=None):
        if deepstack is None:  # decode steps, text-only calls
            return super().run_decoder(lm, inputs_embeds, position_ids, rope_positions=rope_positions)
        with additive_deepstack(self.decoder(lm)):  # HF adds deepstack[l] after layer l for l < len(deepstack)
            return super().run_decoder(lm, inputs_embeds, position_ids, rope_positions=rope_positions,
                                       visual_pos_masks=None, deepstack_visual_embeds=deepstack)


TEXT_FAMILY = Qwen3VLMoeTextFamily(
    model_type="qwen3_vl_moe_text",
    routing="softmax -> top-k (sorted) -> always renormalise",
    tiny_config=text_tiny_config,
    input_specs=INPUT_SPECS,  # rope_positions [3, B, S], deepstack [D, B, S, H] (runtime/frontends/qwen3_vl_moe.py)
    decoder_keywords=((ROPE_POSITIONS.name, "position_ids"),),
)


# --- vision encoder ----------------------------------------------------------------------
class Encoder(torch.nn.Module):
    """One image -> (pooled features [P/m^2, H_text], deepstack features [D, P/m^2, H_text]), run
    by HF's own visual modules. Inputs: the image's patches [P, C*T*ps*ps] and its grid tables
    (grid_tables()), so nothing in the graph depends on the grid's values."""

    def __init__(self, model):
        super().__init__()
        self.visual = model.model.visual

    def forward(self, patches, interp_indices, interp_weights, position_ids, cu_seqlens):
        out = self.visual(patches, grid_thw=None, interp_indices=interp_indices, interp_weights=interp_weights,
                          position_ids=position_ids, cu_seqlens=cu_seqlens, return_dict=True)
        return out.pooler_output, torch.stack(list(out.deepstack_features))


class Qwen3VLMoeFamily(Qwen3VLFrontEnd, grid_vlm.GridVLMFamily):
    max_tiles = 256  # images per prepare() call (one encoder call each)

    def text_causal_lm(self) -> type:
        return text_causal_lm_class()

    def causal_lm(self, model) -> torch.nn.Module:
        # D is a fact of the vision config; the backbone's deepstack input needs it on the text side.
        setattr(model.model.language_model.config, DEEPSTACK_ATTR,
                len(model.config.vision_config.deepstack_visual_indexes))
        return super().causal_lm(model)

    def encoder(self, model) -> torch.nn.Module:
        return Encoder(model).eval()

    def vision_facts(self, config) -> dict:
        v = config.vision_config
        return {**super().vision_facts(config), "num_grid_per_side": int(v.num_position_embeddings ** 0.5),
                "deepstack_layers": len(v.deepstack_visual_indexes)}


FAMILY = Qwen3VLMoeFamily()


# --- built-in models --------------------------------------------------------------
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", VISION_START, VISION_END, IMAGE_PAD, "<|video_pad|>"]


def tiny_config():
    """tiny text model + a 3-block hidden-32 ViT (8 px patches, 2x2 merge, an 8x8 learned position
    grid that every image size interpolates) with deepstack features from blocks 0 and 2."""
    from transformers import Qwen3VLMoeConfig
    from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeVisionConfig

    text = text_tiny_config()
    vision = Qwen3VLMoeVisionConfig(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8,
                                    spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=text.hidden_size,
                                    num_position_embeddings=64, deepstack_visual_indexes=[0, 2],
                                    initializer_range=0.1)
    ids = {name: 256 + i for i, name in enumerate(_SPECIALS)}
    return Qwen3VLMoeConfig(text_config=text, vision_config=vision, image_token_id=ids[IMAGE_PAD],
                            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids[VISION_START],
                            vision_end_token_id=ids[VISION_END], tie_word_embeddings=False)


def tiny_processing(max_pixels: int = 96 * 96):
    """A real tokenizer (byte-level BPE over 256 byte symbols, no merges, plus Qwen's special tokens
    and a chat template) and Qwen2VLImageProcessorPil for 8 px patches (images resized to a
    multiple of 16 px, between 32x32 and max_pixels)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from .vlm import byte_level_tokenizer

    tokenizer = byte_level_tokenizer(
        _SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE,
        extra_special_tokens={"image_token": IMAGE_PAD, "video_token": "<|video_pad|>",
                              "vision_start_token": VISION_START, "vision_end_token": VISION_END},
    )
    image_processor = Qwen2VLImageProcessorPil(patch_size=8, temporal_patch_size=2, merge_size=2,
                                               size={"shortest_edge": 32 * 32, "longest_edge": max_pixels})
    return tokenizer, image_processor
