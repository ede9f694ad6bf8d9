"""An eager reference of the FastMMoE spec, written from the spec text, independent of the product.

It patches the Hugging Face model itself (its routers' outputs, its eager experts
loop), so it shares no code with fastmmoe_compile's graph ops or dispatch. Where the
product rescales kept weights with one generic ratio, this reference applies the
spec's rules case by case, from each family's own routing facts.
"""
from __future__ import annotations

import contextlib

import torch

# Spec section 1, per family: does the model normalise its top-K weights? what scaling follows?
def normalises(config) -> bool:
    if config.model_type == "mixtral":
        return True
    if config.model_type == "deepseek_v2":
        return False  # DeepSeek-V2 ignores norm_topk_prob
    return bool(getattr(config, "norm_topk_prob", False))


def scaling(config) -> float:
    return float(getattr(config, "routed_scaling_factor", 1.0) or 1.0)


def moe_layers(lm):
    return [(i, layer.mlp) for i, layer in enumerate(lm.model.layers) if hasattr(layer.mlp, "gate")
            and hasattr(layer.mlp, "experts")]


def reduce_row(w: torch.Tensor, kv: int, normalise: bool, scale: float) -> torch.Tensor:
    """One vision token's K final weights -> the same K slots with the dropped ones at 0."""
    order = sorted(range(w.numel()), key=lambda j: -float(w[j]))  # highest weight first
    keep = order[:kv]
    out = torch.zeros_like(w)
    if normalise:
        # Kept weights renormalised to sum to 1, then the model's scaling applies again.
        raw = w[keep] / scale
        out[keep] = raw / raw.sum() * scale
    else:
        # Mass preserving: the kept weights sum to what all K summed to.
        out[keep] = w[keep] * (w.sum() / w[keep].sum())
    return out


@contextlib.contextmanager
def eager_topkv(lm, vision_mask: torch.Tensor, reduce_from_layer: int, kv: int):
    """Run `lm` with spec-section-1 routing for the tokens in vision_mask [B, S]."""
    flat_vision = vision_mask.reshape(-1)
    normalise, scale = normalises(lm.config), scaling(lm.config)
    originals = []
    previous_impl = lm.config._experts_implementation
    lm.set_experts_implementation("eager")  # HF's own per-expert loop: not our dispatch
    try:
        for layer, block in moe_layers(lm):
            if layer < reduce_from_layer:
                continue
            gate = block.gate
            original = gate.forward

            def patched(hidden_states, _original=original):
                logits, weights, ids = _original(hidden_states)
                weights = weights.clone()
                for row in torch.nonzero(flat_vision).flatten().tolist():
                    weights[row] = reduce_row(weights[row], kv, normalise, scale)
                return logits, weights, ids

            gate.forward = patched
            originals.append(gate)
        yield lm
    finally:
        for gate in originals:
            del gate.forward
        lm.set_experts_implementation(previous_impl)
