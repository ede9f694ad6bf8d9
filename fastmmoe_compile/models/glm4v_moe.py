"""GLM-4.5V (transformers `glm4v_moe`): a GLM-4.1V-style ViT (learned position table resampled
per image, 2D vision rotary, 2x2 conv downsample + SwiGLU merger) in front of a GLM-4.5-Air MoE.

Language backbone (`glm4v_moe_text`): GLM-4.5's routing (deepseek.py: sigmoid + correction bias,
group-limited top-k, renormalise, scale; shared experts; dense first layers), with 3D multimodal
rotary positions (temporal, height, width; mrope_section over the partial rotary dims). The
exported prefill takes them as the "rope_positions" input [3, B, S]. transformers has no
*ForCausalLM for it: causal_lm_class() below makes that shell (the VLM's own modules, no copies).

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

from . import deepseek
from .base import MoEFamily
from .vlm import PLACEHOLDER, VLMFamily

BEGIN, IMAGE, END = "<|begin_of_image|>", "<|image|>", "<|end_of_image|>"


# --- language backbone ---------------------------------------------------------------
_CAUSAL_LM = None


def causal_lm_class():
    """Glm4vMoeTextForCausalLM: Glm4vMoeTextModel + lm_head, the *ForCausalLM transformers lacks.

    Registered with AutoModelForCausalLM (on first use, not on import: that would import
    transformers' modeling code for every CLI command) so the text preset builds like any other
    family's; a no-op if transformers ever ships its own class."""
    global _CAUSAL_LM
    if _CAUSAL_LM is not None:
        return _CAUSAL_LM
    from transformers import AutoModelForCausalLM, Glm4vMoeTextConfig
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.models.glm4v_moe import modeling_glm4v_moe as m

    class Glm4vMoeTextForCausalLM(m.Glm4vMoePreTrainedModel):
        config_class = Glm4vMoeTextConfig
        base_model_prefix = "model"
        _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
        # transformers decides this by grepping the class's module for @use_experts_implementation;
        # the experts live in modeling_glm4v_moe, which has it.
        _can_set_experts_implementation_cached_value = True

        def __init__(self, config):
            super().__init__(config)
            self.model = m.Glm4vMoeTextModel(config)
            self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                    inputs_embeds=None, use_cache=None, logits_to_keep=0, **kwargs):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             **kwargs)
            hidden = out.last_hidden_state
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            return CausalLMOutputWithPast(logits=self.lm_head(hidden[:, keep]), past_key_values=out.past_key_values)

    if Glm4vMoeTextConfig not in AutoModelForCausalLM._model_mapping:  # else keep transformers' own class
        # exist_ok: transformers otherwise ignores registrations for its own config classes.
        AutoModelForCausalLM.register(Glm4vMoeTextConfig, Glm4vMoeTextForCausalLM, exist_ok=True)
    _CAUSAL_LM = Glm4vMoeTextForCausalLM
    return _CAUSAL_LM


@dataclasses.dataclass(frozen=True)
class Glm4vMoeTextFamily(MoEFamily):
    """GLM-4.5's MoE facts plus the "rope_positions" input."""

    def run_decoder(self, lm, inputs_embeds, position_ids=None, rope_positions=None, **extras):
        # Prefill: the 3D positions [3, B, S]; decode: text positions [B, 1], which the model
        # expands to three identical rows.
        positions = rope_positions if rope_positions is not None else position_ids
        return self.decoder(lm)(inputs_embeds=inputs_embeds, position_ids=positions,
                                use_cache=False).last_hidden_state


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


_routed = deepseek._sigmoid_routed("glm4v_moe_text", tiny_text_config)  # GLM-4.5's routing facts, one place
TEXT_FAMILY = Glm4vMoeTextFamily(**{
    **{f.name: getattr(_routed, f.name) for f in dataclasses.fields(_routed)},
    "extra_inputs": ("rope_positions",),
})


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


def vision_tables(grid, merge: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's grid (t, h, w) -> (grid_thw [1, 3], rotary position ids [P, 2], cu_seqlens [t + 1])."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

    grid_thw = torch.tensor([list(grid)], dtype=torch.long)
    return grid_thw, get_vision_position_ids(grid_thw, merge), get_vision_cu_seqlens(grid_thw)


class Glm4vMoeFamily(VLMFamily):
    model_type = "glm4v_moe"
    max_tiles = 16  # images per call (the runtime encodes them one at a time)
    max_patches = 1 << 16  # patches per image the exported encoder takes (GLM-4.5V's processor: up to 60000)

    def text_config(self, config):
        return config.text_config

    def causal_lm(self, model) -> torch.nn.Module:
        from .vlm import share_modules

        language_model = model.model.language_model
        with torch.device("meta"):
            shell = causal_lm_class()(language_model.config)
        shell = share_modules(shell, model=language_model, lm_head=model.lm_head)
        shell.config = language_model.config  # one config object: implementation switches reach the layers
        return shell.eval()

    def encoder(self, model) -> torch.nn.Module:
        return Encoder(model).eval()

    def vision_facts(self, config) -> dict:
        v = config.vision_config
        return {
            "image_token_id": int(config.image_token_id),
            "merge_size": int(v.spatial_merge_size),
            "patch_dim": int(v.in_channels * v.temporal_patch_size * v.patch_size ** 2),
        }

    # --- input side --------------------------------------------------------------
    def prompt_text(self, tokenizer, prompt: str, chat: bool) -> str:
        image = f"{BEGIN}{IMAGE}{END}"
        if not chat:
            return prompt.replace(PLACEHOLDER, image)
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

    def tiles(self, image_processor, images: list) -> tuple:
        out = image_processor(images=images, return_tensors="pt")
        grids = [[int(x) for x in g] for g in out["image_grid_thw"]]
        return out["pixel_values"], [1] * len(grids), grids  # one encoder call per image

    def expand(self, tokenizer, text: str, grids: list, facts: dict) -> str:
        parts = text.split(IMAGE)
        if len(parts) - 1 != len(grids):
            raise ValueError(f"the prompt has {len(parts) - 1} image tokens for {len(grids)} images")
        runs = [IMAGE * self.image_tokens(g, facts) for g in grids]
        return parts[0] + "".join(run + part for run, part in zip(runs, parts[1:]))

    @staticmethod
    def image_tokens(grid, facts: dict) -> int:
        t, h, w = grid
        return t * h * w // facts["merge_size"] ** 2

    def encode(self, encoder, pixel_values, grids: list, facts: dict) -> list:
        features, start = [], 0
        for grid in grids:
            count = grid[0] * grid[1] * grid[2]
            grid_thw, position_ids, cu_seqlens = vision_tables(grid, facts["merge_size"])
            features.append(encoder(pixel_values[start:start + count].contiguous(), grid_thw, position_ids,
                                    cu_seqlens))
            start += count
        if start != pixel_values.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} patches for image grids totalling {start}")
        return features

    def arrange(self, outputs: list, grids: list, facts: dict) -> torch.Tensor:
        return torch.cat(outputs, dim=0)  # each image's merged tokens, in prompt order

    def rope_positions(self, input_ids: torch.Tensor, grids: list, facts: dict):
        return rope_index(input_ids, grids, facts["image_token_id"], facts["merge_size"])

    # --- export of the vision encoder ----------------------------------------------
    def vision_export_inputs(self, encoder, facts: dict) -> tuple[tuple, dict]:
        from torch.export import Dim

        param = next(encoder.parameters())
        merge = facts["merge_size"]
        grid = (1, 4 * merge, 2 * merge)  # 8 merged tokens; any grid gives the same graph
        grid_thw, position_ids, cu_seqlens = vision_tables(grid, merge)
        pixels = torch.zeros(grid_thw.prod(), facts["patch_dim"], dtype=param.dtype, device=param.device)
        # P is a multiple of merge^2 (the downsample conv folds merge x merge blocks).
        patches = merge ** 2 * Dim("merged", min=2, max=self.max_patches // merge ** 2)
        dynamic = {"pixel_values": {0: patches}, "grid_thw": None, "position_ids": {0: patches},
                   "cu_seqlens": None}
        return (pixels, grid_thw, position_ids, cu_seqlens), dynamic

    def export_context(self):
        # transformers' export patches: the packed vision attention's per-segment split loop
        # becomes a reshape into a batch of equal segments (one image: one segment).
        from transformers.exporters.utils import apply_patches

        return apply_patches("dynamo")


def rope_index(input_ids: torch.Tensor, grids: list, image_token_id: int, merge: int):
    """One sample's 3D rotary positions [3, S] and where decode continues (max + 1), as
    Glm4vMoeModel.get_rope_index computes them: each run of image tokens is one image."""
    ids = input_ids.tolist()
    rows, current, g, i = [], 0, 0, 0
    while i < len(ids):
        j = i
        if ids[i] != image_token_id:
            while j < len(ids) and ids[j] != image_token_id:
                j += 1
            rows.append(torch.arange(current, current + j - i).expand(3, -1))
            current += j - i
        else:
            while j < len(ids) and ids[j] == image_token_id:
                j += 1
            if g >= len(grids):
                raise ValueError(f"more image-token runs in the prompt than its {len(grids)} image(s)")
            t, h, w = grids[g][0], grids[g][1] // merge, grids[g][2] // merge
            if t * h * w != j - i:
                raise ValueError(f"image {g}: {j - i} image tokens for a {t}x{h}x{w} merged grid")
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            rows.append(torch.stack([tt, hh, ww]).reshape(3, -1) + current)
            current += max(h, w)
            g += 1
        i = j
    if g != len(grids):
        raise ValueError(f"{g} image-token runs in the prompt for {len(grids)} image(s)")
    positions = torch.cat(rows, dim=1) if rows else torch.zeros(3, 0, dtype=torch.long)
    return positions.to(torch.long), int(positions.max()) + 1 if rows else 0


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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Glm4vImageProcessorPil, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(_SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE,
        extra_special_tokens={"image_token": IMAGE, "video_token": "<|video|>"},
    )
    # Images resized to multiples of 8 px (patch 4 x merge 2), between 16x16 and 48x48 pixels' worth.
    image_processor = Glm4vImageProcessorPil(size={"shortest_edge": 16 * 16, "longest_edge": 48 * 48},
                                             patch_size=4, temporal_patch_size=2, merge_size=2)
    return tokenizer, image_processor
