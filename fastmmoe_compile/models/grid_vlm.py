"""Native-resolution VLMs (Qwen3-VL-MoE, GLM-4.5V): what their adapters share.

- Images are patch grids of any size, not fixed tiles: the image processor resizes each image
  to a multiple of patch x merge and returns its patches [P, C*T*ps*ps] with its grid (t, h, w);
  an image's placeholder token expands to t*h*w / merge^2 copies.
- The vision encoder runs once per image (one attention segment), on the patches plus grid
  tables computed on the host (transformers.vision_utils), so nothing in its graph depends on
  the grid's values; transformers' export patches turn the packed vision attention into one SDPA.
- The language model takes 3D rotary positions (temporal, height, width) computed on the host
  (rope_index below, HF's get_rope_index); decode continues at their max + 1.
- transformers has no *ForCausalLM for their text models: text_causal_lm_class makes one.
"""
from __future__ import annotations

import copy

import functools

import torch

from ..transformers_compat import allow_experts_implementation, export_patches, output_cache, output_cache_field
from .vlm import VLMFamily, chat_prompt, share_modules


@functools.cache
def text_causal_lm_class(pretrained_base: type, text_model: type, config_class: type) -> type:
    """`text_model` + lm_head as a *ForCausalLM (what LoadedModel.lm is), registered with
    AutoModelForCausalLM so text presets build like any family's. Made on first use: importing the
    modeling code costs seconds the CLI should not pay for other families."""
    from transformers import AutoModelForCausalLM, GenerationMixin
    from transformers.modeling_outputs import CausalLMOutputWithPast

    @allow_experts_implementation
    class TextForCausalLM(pretrained_base, GenerationMixin):
        _no_split_modules = getattr(pretrained_base, "_no_split_modules", None)

        def __init__(self, config):
            super().__init__(config)
            self.model = text_model(config)
            self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                    use_cache=None, logits_to_keep: int = 0, **kwargs):
            # The KV cache passes through in kwargs, under whichever keyword this transformers uses.
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
            hidden = out.last_hidden_state
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            return CausalLMOutputWithPast(logits=self.lm_head(hidden[:, keep]),
                                          **{output_cache_field(CausalLMOutputWithPast): output_cache(out)})

    TextForCausalLM.config_class = config_class
    TextForCausalLM.__name__ = TextForCausalLM.__qualname__ = text_model.__name__.replace("Model", "ForCausalLM")
    if config_class not in AutoModelForCausalLM._model_mapping:  # else keep transformers' own class
        # exist_ok: transformers otherwise ignores registrations for its own config classes.
        AutoModelForCausalLM.register(config_class, TextForCausalLM, exist_ok=True)
    return TextForCausalLM


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


class GridVLMFamily(VLMFamily):
    """A VLM adapter for images as patch grids. Subclasses say how the image is written in the chat
    (image_text, image_token), make the text model class (text_causal_lm), and how the encoder is
    fed (grid_inputs, output_token_dims)."""

    image_text: str  # what the chat template writes for one image, e.g. <|vision_start|><|image_pad|><|vision_end|>
    image_token: str  # the token that expand() repeats
    max_tiles = 16  # images per prepare() call (the runtime encodes them one at a time)
    max_patches = 1 << 16  # patches of one image the exported encoder takes
    min_merged_tokens = 1  # smallest image (merged tokens) the exported encoder takes
    output_token_dims: tuple[int, ...] = (0,)  # per encoder output, its token dimension

    def text_causal_lm(self) -> type:
        raise NotImplementedError

    def text_config(self, config):
        return config.text_config

    def causal_lm(self, model) -> torch.nn.Module:
        language_model = model.model.language_model
        with torch.device("meta"):
            # A copy: building a model sets the attention implementation on its config, and this one is the user's.
            shell = self.text_causal_lm()(copy.deepcopy(language_model.config))
        shell = share_modules(shell, model=language_model, lm_head=model.lm_head)
        shell.config = language_model.config  # one config object: implementation switches reach the layers
        return shell.eval()

    def vision_facts(self, config) -> dict:
        v = config.vision_config
        return {
            "image_token_id": int(config.image_token_id),
            "spatial_merge_size": int(v.spatial_merge_size),
            "patch_dim": int(v.in_channels * v.temporal_patch_size * v.patch_size ** 2),  # one patch's pixels
        }

    def merge_size(self, facts: dict) -> int:
        return int(facts["spatial_merge_size"])

    def grid_inputs(self, grid, facts: dict) -> tuple:
        """One image's grid (t, h, w) -> the encoder's inputs after its patches."""
        raise NotImplementedError

    # --- input side --------------------------------------------------------------
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

    # --- export of the vision encoder ---------------------------------------------------
    def vision_export_inputs(self, encoder: torch.nn.Module, facts: dict) -> tuple[tuple, dict]:
        """Any grid traces the same graph: every per-patch input's first dim is P = merge^2 x tokens."""
        from torch.export import Dim

        param = next(encoder.parameters())
        merge = self.merge_size(facts)
        grid = (1, 2 * merge, 3 * merge)
        count = grid[0] * grid[1] * grid[2]
        patches = torch.zeros(count, int(facts["patch_dim"]), dtype=param.dtype, device=param.device)
        tables = tuple(x.to(param.device) for x in self.grid_inputs(grid, facts))
        p = merge ** 2 * Dim("merged_patches", min=self.min_merged_tokens, max=self.max_patches // merge ** 2)
        dynamic = ({0: p}, *({0: p} if x.dim() and x.shape[0] == count else None for x in tables))
        return (patches, *tables), dynamic

    def export_context(self):
        """transformers' export patches: the packed vision attention (a cu_seqlens split loop) becomes
        one reshape-into-batch SDPA; one image per call is one segment."""
        return export_patches()
