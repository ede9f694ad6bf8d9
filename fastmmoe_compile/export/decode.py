"""The KV cache, in and out of the exported programs.

Prefill: every attention module gets a recording cache, so the program also returns what
the layer caches (what its HF cache's `update` receives: post-rotary keys and
values, or DeepSeek's compressed MLA latents). The mask and attention are untouched, so
the prefill graph is the same one the passes rewrite; a merge shortens the caches of later
layers by construction (layer l's cache holds the tokens that reached layer l).

Decode: `DecodeStep` is the unmodified backbone's one-token step. Each layer gets its own
cache (its own dynamic length), its own padding mask and the explicit rotary positions;
it returns the logits and only the new K/V rows, which the runtime appends into its
preallocated per-layer buffers. Caches come in seq-major, [L, B, heads, dim], so that
the runtime's `buffer[:L]` is a contiguous view, never a copy; the one copy per step is
the concatenation attention needs, as in HF's DynamicCache.
"""
from __future__ import annotations

import contextlib

import torch
from torch.export import Dim, ExportedProgram

from ..errors import UnsupportedModelError
from ..models.families import LoadedModel
from ..transformers_compat import cache_keyword, frozen_for_export, sdpa_attention
from .dispatch import owned_dispatch


def attention_modules(loaded: LoadedModel) -> list[torch.nn.Module]:
    layers = loaded.family.decoder(loaded.lm).layers
    if not all(hasattr(layer, "self_attn") for layer in layers):
        raise UnsupportedModelError(f"{loaded.family.model_type}: decoder layers without .self_attn "
                                    "(no KV cache support)")
    return [layer.self_attn for layer in layers]


class RecordingCache:
    """Duck-typed KV cache (what attention modules call `.update` on) for prefill: keeps each layer's update, changes nothing."""

    def __init__(self):
        self.entries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key, value, layer_idx, *args, **kwargs):
        self.entries[layer_idx] = (key, value)
        return key, value


class StepCache:
    """Duck-typed KV cache for one decode step over explicit per-layer caches."""

    def __init__(self, keys, values):
        self.keys, self.values = keys, values  # per layer [L, B, heads, dim]
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key, value, layer_idx, *args, **kwargs):
        self.new[layer_idx] = (key, value)  # [B, heads, 1, dim]
        # Concatenate seq-major (both sides contiguous), then view as [B, heads, L + 1, dim].
        keys = torch.cat([self.keys[layer_idx], key.permute(2, 0, 1, 3)], dim=0)
        values = torch.cat([self.values[layer_idx], value.permute(2, 0, 1, 3)], dim=0)
        return keys.permute(1, 2, 0, 3), values.permute(1, 2, 0, 3)


@contextlib.contextmanager
def injected_cache(modules, cache, masks=None):
    """Hand `cache` (and, per layer, an attention mask) to every attention module's forward.

    The model itself runs without a cache, so its own mask code is unchanged. The keyword
    follows the installed transformers (transformers_compat.cache_keyword)."""
    handles = []

    def hook_for(index, keyword):
        def hook(module, args, kwargs):
            kwargs[keyword] = cache
            if masks is not None:
                kwargs["attention_mask"] = masks[index]
            return args, kwargs

        return hook

    try:
        for i, m in enumerate(modules):
            if getattr(m, "layer_idx", i) != i:
                raise NotImplementedError(f"attention module {i} has layer_idx {m.layer_idx}")
            handles.append(m.register_forward_pre_hook(hook_for(i, cache_keyword(m)), with_kwargs=True))
        yield cache
    finally:
        for h in handles:
            h.remove()


class DecodeStep(torch.nn.Module):
    """(inputs_embeds [B, 1, H], position_ids [B, 1], keys, values, masks) -> (logits [B, V], new_keys, new_values).

    keys/values: per layer [L_l, B, heads, dim]; masks: per layer [B, L_l] bool, True where
    the slot holds a token of that sample (padding slots are False). new_*: per layer [B, heads, 1, dim].
    """

    def __init__(self, loaded: LoadedModel):
        super().__init__()
        self.lm = loaded.lm
        self._family = loaded.family
        self._attention = attention_modules(loaded)  # a plain list: not registered twice

    def forward(self, inputs_embeds, position_ids, keys: list, values: list, masks: list):
        if not (len(keys) == len(values) == len(masks) == len(self._attention)):
            raise ValueError(f"expected {len(self._attention)} layers of keys, values and masks")
        cache = StepCache(keys, values)
        batch = inputs_embeds.shape[0]
        additive = []
        for mask in masks:  # the new token always sees itself
            full = torch.cat([mask, torch.ones(batch, 1, dtype=torch.bool, device=mask.device)], dim=1)
            additive.append(torch.zeros(full.shape, dtype=inputs_embeds.dtype, device=full.device)
                            .masked_fill(~full, torch.finfo(inputs_embeds.dtype).min)[:, None, None, :])
        with injected_cache(self._attention, cache, additive):
            hidden = self._family.run_decoder(self.lm, inputs_embeds, position_ids=position_ids)
        logits = self.lm.lm_head(hidden[:, -1])
        n = len(self._attention)
        return logits, [cache.new[i][0] for i in range(n)], [cache.new[i][1] for i in range(n)]


def example_decode_inputs(loaded: LoadedModel, batch: int = 2):
    """Distinct example lengths per layer, so that no two cache dims get unified while tracing."""
    param = next(loaded.lm.parameters())
    prefill = RecordingCache()
    seq = 4
    with injected_cache(attention_modules(loaded), prefill), torch.no_grad(), \
            owned_dispatch(loaded.family.experts_modules(loaded.lm)):
        loaded.family.run_decoder(
            loaded.lm, torch.zeros(batch, seq, loaded.config.hidden_size, dtype=param.dtype, device=param.device),
            position_ids=torch.arange(seq, device=param.device).expand(batch, seq))
    keys, values, masks = [], [], []
    for i in range(len(prefill.entries)):
        k, v = prefill.entries[i]
        length = 5 + i
        keys.append(torch.zeros(length, batch, k.shape[1], k.shape[3], dtype=k.dtype, device=k.device))
        values.append(torch.zeros(length, batch, v.shape[1], v.shape[3], dtype=v.dtype, device=v.device))
        masks.append(torch.ones(batch, length, dtype=torch.bool, device=k.device))
    embeds = torch.zeros(batch, 1, loaded.config.hidden_size, dtype=param.dtype, device=param.device)
    positions = torch.full((batch, 1), 7, dtype=torch.long, device=param.device)
    return embeds, positions, keys, values, masks


def export_decode(loaded: LoadedModel, max_seq: int | None = None) -> ExportedProgram:
    """Export the one-token step (no passes: decode tokens are text tokens, plain top-K), with
    SDPA attention whatever the model was loaded with (its own settings come back afterwards)."""
    with frozen_for_export(loaded.lm), sdpa_attention(loaded.lm):
        return _export_decode(loaded, max_seq)


def _export_decode(loaded: LoadedModel, max_seq: int | None) -> ExportedProgram:
    lm = loaded.lm
    max_seq = max_seq or int(getattr(loaded.config, "max_position_embeddings", 32768))
    embeds, positions, keys, values, masks = example_decode_inputs(loaded)
    batch = Dim("B", min=1, max=4096)
    lengths = [Dim(f"L{i}", min=2, max=max_seq) for i in range(len(keys))]
    dynamic = {
        "inputs_embeds": {0: batch}, "position_ids": {0: batch},
        "keys": [{0: length, 1: batch} for length in lengths],
        "values": [{0: length, 1: batch} for length in lengths],
        "masks": [{0: batch, 1: length} for length in lengths],
    }
    with owned_dispatch(loaded.family.experts_modules(lm)), torch.no_grad():
        return torch.export.export(DecodeStep(loaded), (embeds, positions, keys, values, masks),
                                   dynamic_shapes=dynamic, strict=False,
                                   prefer_deferred_runtime_asserts_over_guards=True)
