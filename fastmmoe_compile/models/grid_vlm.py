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
from ..runtime.frontends.grid import GridFrontEnd, rope_index  # noqa: F401  (rope_index re-exported)
from .vlm import VLMFamily, share_modules


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


class GridVLMFamily(GridFrontEnd, VLMFamily):
    """A VLM adapter for images as patch grids. Its front end (GridFrontEnd subclass, first in the
    bases) says how images are written and fed; subclasses make the text model class (text_causal_lm)."""

    max_tiles = 16  # images per prepare() call (the runtime encodes them one at a time)
    min_merged_tokens = 1  # smallest image (merged tokens) the exported encoder takes

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
