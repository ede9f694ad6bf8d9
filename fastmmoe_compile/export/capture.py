"""torch.export of the language backbone, with a dynamic batch, sequence and vision count.

The exported signature is the one every backend runs:
    (inputs_embeds [B, S, H], vision_positions [B, N] int64)
        -> (logits [B, vocab] at the last position, kept_positions [B, S'] int64)
With cache=True it also returns every layer's KV cache, flat: key_0, value_0, key_1, ...,
each [B, heads, S_l, dim] as the layer caches it (export/decode.py).
Vision tokens come in as positions, not a mask, so every shape in the graph is a
function of input shapes (B, S, N) and never of data: the same graph then serves every backend.
Families with more inputs (MoEFamily.input_specs, e.g. multimodal rotary positions) take them
after these two, in order, each of its spec's shape (runtime/specs.py), B and S dynamic.
"""
from __future__ import annotations

import inspect

import torch
from torch.export import Dim, ExportedProgram

from ..models.families import LoadedModel
from ..runtime.specs import BATCH, SEQUENCE
from ..transformers_compat import frozen_for_export, sdpa_attention
from .decode import RecordingCache, attention_modules, injected_cache
from .dispatch import owned_dispatch

INPUT_NAMES = ("inputs_embeds", "vision_positions")  # then the family's input_specs, in that order


class Backbone(torch.nn.Module):
    """The language model as the engine runs it: embeddings in, next-token logits out."""

    def __init__(self, loaded: LoadedModel, cache: bool = False):
        super().__init__()
        self.lm = loaded.lm
        self._family = loaded.family
        self._attention = attention_modules(loaded) if cache else None  # a plain list: not registered twice

    def forward(self, inputs_embeds: torch.Tensor, vision_positions: torch.Tensor, *extras: torch.Tensor):
        batch, seq = inputs_embeds.shape[:2]
        if len(extras) != len(self._family.input_specs):
            raise ValueError(f"the {self._family.model_type} backbone also takes {list(self._family.extra_inputs)}")
        recorder = RecordingCache()
        with injected_cache(self._attention or [], recorder):
            hidden = self._family.run_decoder(self.lm, inputs_embeds, **dict(zip(self._family.extra_inputs, extras)))
        logits = self.lm.lm_head(hidden[:, -1])
        kept_positions = torch.arange(seq, device=inputs_embeds.device).expand(batch, seq)
        cache = [t for i in sorted(recorder.entries) for t in recorder.entries[i]]
        return (logits, kept_positions, *cache)


def _named(backbone: Backbone, names: tuple[str, ...]) -> Backbone:
    """`backbone` whose forward's signature names each extra input: torch.export names the program's
    inputs (and ONNX's) after it, and takes dynamic_shapes by those names."""
    P = inspect.Parameter
    params = [P(n, P.POSITIONAL_OR_KEYWORD) for n in ("self", *INPUT_NAMES, *names)]

    def forward(self, *args):
        return Backbone.forward(self, *args)

    forward.__signature__ = inspect.Signature(params)
    backbone.__class__ = type("Backbone", (Backbone,), {"forward": forward, "__doc__": Backbone.__doc__})
    return backbone


def example_inputs(loaded: LoadedModel, batch: int = 2, seq: int = 24, vision: int = 12) -> tuple:
    """Inputs used to trace (values never matter; shapes stay symbolic): each extra input its absent value."""
    param = next(loaded.lm.parameters())
    hidden = loaded.config.hidden_size
    embeds = torch.zeros(batch, seq, hidden, dtype=param.dtype, device=param.device)
    positions = torch.arange(2, 2 + vision, device=param.device).expand(batch, vision).contiguous()
    facts = loaded.describe()
    extras = (spec.absent_value(batch, seq, facts, param.dtype).to(param.device).contiguous()
              for spec in loaded.family.input_specs)
    return (embeds, positions, *extras)


def input_names(loaded: LoadedModel) -> tuple[str, ...]:
    return (*INPUT_NAMES, *loaded.family.extra_inputs)


def export_backbone(loaded: LoadedModel, max_seq: int | None = None, cache: bool = False) -> ExportedProgram:
    """Export the backbone with our dispatch in place of the experts' forward (and its KV cache outputs).

    Attention is exported as SDPA whatever the model was loaded with (the token-reduction passes
    rewrite `scaled_dot_product_attention`); the model's own settings come back afterwards."""
    lm = loaded.lm
    max_seq = max_seq or int(getattr(loaded.config, "max_position_embeddings", 32768))
    batch, seq, vision = Dim("B", min=1, max=4096), Dim("S", min=2, max=max_seq), Dim("N", min=0, max=max_seq)
    dims = {BATCH: batch, SEQUENCE: seq}
    axes = {"inputs_embeds": {0: batch, 1: seq}, "vision_positions": {0: batch, 1: vision},
            **{spec.name: {i: dims[d] for i, d in enumerate(spec.dims) if d in dims}
               for spec in loaded.family.input_specs}}
    with owned_dispatch(loaded.family.experts_modules(lm)), torch.no_grad(), frozen_for_export(lm), \
            sdpa_attention(lm):
        backbone = _named(Backbone(loaded, cache), loaded.family.extra_inputs)
        return torch.export.export(backbone, example_inputs(loaded), strict=False,
                                   dynamic_shapes={name: axes[name] for name in input_names(loaded)})
