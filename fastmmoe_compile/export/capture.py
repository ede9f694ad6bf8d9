"""torch.export of the language backbone, with a dynamic batch, sequence and vision count.

The exported signature is the one every backend runs:
    (inputs_embeds [B, S, H], vision_positions [B, N] int64)
        -> (logits [B, vocab] at the last position, kept_positions [B, S'] int64)
With cache=True it also returns every layer's KV cache, flat: key_0, value_0, key_1, ...,
each [B, heads, S_l, dim] as the layer caches it (export/decode.py).
Vision tokens come in as positions, not a mask, so every shape in the graph is a
function of input shapes (B, S, N) and never of data: the same graph then serves every backend.
Families with multimodal rotary positions or deepstack features take them after these two
(MoEFamily.extra_inputs): rope_positions [3, B, S] int64, deepstack [D, B, S, H].
"""
from __future__ import annotations

import torch
from torch.export import Dim, ExportedProgram

from ..models.families import LoadedModel
from ..runtime.inputs import EXTRA_INPUTS
from ..transformers_compat import frozen_for_export, sdpa_attention
from .decode import RecordingCache, attention_modules, injected_cache
from .dispatch import owned_dispatch

INPUT_NAMES = ("inputs_embeds", "vision_positions")  # then EXTRA_INPUTS (runtime/inputs.py), in that order


class Backbone(torch.nn.Module):
    """The language model as the engine runs it: embeddings in, next-token logits out."""

    def __init__(self, loaded: LoadedModel, cache: bool = False):
        super().__init__()
        self.lm = loaded.lm
        self._family = loaded.family
        self._attention = attention_modules(loaded) if cache else None  # a plain list: not registered twice

    def forward(self, inputs_embeds: torch.Tensor, vision_positions: torch.Tensor,
                rope_positions: torch.Tensor | None = None, deepstack: torch.Tensor | None = None):
        batch, seq = inputs_embeds.shape[:2]
        given = {"rope_positions": rope_positions, "deepstack": deepstack}
        extras = {name: given[name] for name in self._family.extra_inputs}
        if any(v is None for v in extras.values()):
            raise ValueError(f"the {self._family.model_type} backbone also takes {list(extras)}")
        recorder = RecordingCache()
        with injected_cache(self._attention or [], recorder):
            hidden = self._family.run_decoder(self.lm, inputs_embeds, **extras)
        logits = self.lm.lm_head(hidden[:, -1])
        kept_positions = torch.arange(seq, device=inputs_embeds.device).expand(batch, seq)
        cache = [t for i in sorted(recorder.entries) for t in recorder.entries[i]]
        return (logits, kept_positions, *cache)


def example_inputs(loaded: LoadedModel, batch: int = 2, seq: int = 24, vision: int = 12) -> tuple:
    """Inputs used to trace (values never matter; shapes stay symbolic)."""
    param = next(loaded.lm.parameters())
    hidden = loaded.config.hidden_size
    embeds = torch.zeros(batch, seq, hidden, dtype=param.dtype, device=param.device)
    positions = torch.arange(2, 2 + vision, device=param.device).expand(batch, vision).contiguous()
    extras = {
        "rope_positions": lambda: torch.arange(seq, device=param.device).expand(3, batch, seq).contiguous(),
        "deepstack": lambda: torch.zeros(loaded.family.deepstack_layers(loaded.config), batch, seq, hidden,
                                         dtype=param.dtype, device=param.device),
    }
    return (embeds, positions, *(extras[name]() for name in loaded.family.extra_inputs))


def input_names(loaded: LoadedModel) -> tuple[str, ...]:
    extras = loaded.family.extra_inputs
    if tuple(extras) != EXTRA_INPUTS[:len(extras)]:  # they are positional after INPUT_NAMES
        raise ValueError(f"{loaded.family.model_type}: extra_inputs must be a prefix of {EXTRA_INPUTS}")
    return (*INPUT_NAMES, *extras)


def export_backbone(loaded: LoadedModel, max_seq: int | None = None, cache: bool = False) -> ExportedProgram:
    """Export the backbone with our dispatch in place of the experts' forward (and its KV cache outputs).

    Attention is exported as SDPA whatever the model was loaded with (the token-reduction passes
    rewrite `scaled_dot_product_attention`); the model's own settings come back afterwards."""
    lm = loaded.lm
    max_seq = max_seq or int(getattr(loaded.config, "max_position_embeddings", 32768))
    batch, seq, vision = Dim("B", min=1, max=4096), Dim("S", min=2, max=max_seq), Dim("N", min=0, max=max_seq)
    axes = {"inputs_embeds": {0: batch, 1: seq}, "vision_positions": {0: batch, 1: vision},
            "rope_positions": {1: batch, 2: seq}, "deepstack": {1: batch, 2: seq}}
    with owned_dispatch(loaded.family.experts_modules(lm)), torch.no_grad(), frozen_for_export(lm), \
            sdpa_attention(lm):
        return torch.export.export(Backbone(loaded, cache), example_inputs(loaded), strict=False,
                                   dynamic_shapes={name: axes[name] for name in input_names(loaded)})
