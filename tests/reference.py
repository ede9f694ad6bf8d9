"""An eager reference of docs/fastmmoe.md, written from its text, independent of the product.

It patches the Hugging Face model itself (its routers' outputs, its eager experts
loop), so it shares no code with fastmmoe_compile's graph ops or dispatch. Where the
product rescales kept weights with one generic ratio, this reference applies the
docs/fastmmoe.md's rules case by case, from each family's own routing facts.
"""
from __future__ import annotations

import contextlib
import math

import torch

# docs/fastmmoe.md section 1, per family: does the model normalise its top-K weights? what scaling follows?
def normalises(config) -> bool:
    if config.model_type == "mixtral":
        return True
    if config.model_type == "deepseek_v2":
        return False  # DeepSeek-V2 ignores norm_topk_prob
    if config.model_type == "qwen3_vl_moe_text":
        return True  # its router always renormalises (no norm_topk_prob)
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
def eager_topkv(lm, vision_mask, reduce_from_layer: int, kv: int):
    """Run `lm` with docs/fastmmoe.md section 1 routing for the tokens in vision_mask [B, S]
    (or a callable returning the current mask, for sequences that shrink)."""
    current_mask = vision_mask if callable(vision_mask) else (lambda: vision_mask)
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
                flat_vision = torch.as_tensor(current_mask()).reshape(-1)
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


# --- docs/fastmmoe.md section 2, from its text ----------------------------------------------------

def router_probabilities(lm, layer, normed: torch.Tensor) -> torch.Tensor:
    """The layer's routing distribution over all E experts: its own scoring function."""
    logits = layer.mlp.gate(normed.reshape(-1, normed.shape[-1]))[0].float()
    sigmoid = ("deepseek_v3", "glm4_moe", "glm4v_moe_text")
    return logits.sigmoid() if lm.config.model_type in sigmoid else logits.softmax(dim=-1)


def reference_stage(h, p, a, vision: list[bool], ratio, merge_ratio, window, alpha, strategy, method,
                    compat: bool = False):
    """One stage on one sample, in plain Python over token indices.
    h [S, H], p [S, E], a [S]. Returns (kept indices, new h, new vision flags).
    compat: the authors' released code (docs/fastmmoe.md 2.11), written from its description there."""
    vis = [i for i, v in enumerate(vision) if v]
    n = len(vis)
    target = max(1, math.floor(n * ratio))
    if n <= target:
        return list(range(len(vision))), h, vision
    windows = [vis[g * window:(g + 1) * window] for g in range(math.ceil(n / window))]
    wanted = math.floor(target * merge_ratio)
    m = min(wanted, len(windows) - 1)
    if compat and m <= 0:
        return list(range(len(vision))), h, vision  # the authors skip the whole stage

    def cos(x, y):
        return float(torch.dot(x, y) / (x.norm() * y.norm()))

    global_mean = torch.stack([p[i] for i in vis]).mean(dim=0)
    s, att = [], []
    for w in windows:
        rows = [p[i] for i in w]
        if compat:  # a short window is filled up with copies of the mean routing vector of all vision tokens
            rows += [global_mean] * (window - len(w))
        centre = torch.stack(rows).mean(dim=0)
        s.append(0.0 if compat and len(w) < 2 else sum(cos(p[i], centre) for i in w) / len(w))
        att.append(sum(float(a[i]) for i in w) / len(w))
    top = max(att)
    att = [x / (top + 1e-10) if compat else x / top for x in att]
    if strategy == "hybrid":
        c = [alpha * s[g] - (1 - alpha) * att[g] for g in range(len(windows))]
    elif strategy == "routing":
        c = s
    else:
        c = [-x for x in att]
    ranked = sorted(range(len(windows)), key=lambda g: (-c[g], g))
    eligible = ranked if compat else [g for g in ranked if len(windows[g]) >= 2]
    merged = sorted(eligible[:m])
    in_merged = {i for g in merged for i in windows[g]}
    rest = [i for i in vis if i not in in_merged]
    importance = {i: (float(p[i].norm()) if strategy == "routing" else float(a[i])) for i in rest}
    # Unmerged tokens kept: T - M; the authors' T - floor(T*mr), at most the tokens outside merged
    # windows, counted as if every merged window were full (docs/fastmmoe.md 2.11).
    keep_count = min(target - wanted, n - m * window) if compat else target - m
    kept_rest = sorted(rest, key=lambda i: (-importance[i], i))[:keep_count]
    firsts = {windows[g][0]: windows[g] for g in merged}
    keep = sorted([i for i, v in enumerate(vision) if not v] + kept_rest + list(firsts))
    rows = []
    for i in keep:
        if i in firsts:
            x = torch.stack([h[j] for j in firsts[i]])
            mean = x.mean(dim=0)
            if method == "mlerp":
                mean = mean / max(float(mean.norm()), 1e-10) * max(float(r.norm()) for r in x)
            rows.append(mean)
        else:
            rows.append(h[i])
    return keep, torch.stack(rows), [vision[i] for i in keep]


def rotary_positions(rope_positions, b: int, positions: list[int]) -> torch.Tensor:
    """The rotary position ids of sample b's kept tokens: [1, S'] (0..S-1 originally), or with
    multimodal rotary positions rope_positions [3, B, S] their columns [3, 1, S']."""
    if rope_positions is None:
        return torch.tensor(positions)[None]
    return rope_positions[:, b, positions][:, None, :]


def with_deepstack(h, deepstack, index: int, b: int, positions: list[int]) -> torch.Tensor:
    """After decoder layer `index`: DeepStack (Qwen3-VL) adds deepstack [D, B, S, H] (zero at text
    positions) for index < D, each kept token taking its own original position's feature."""
    if deepstack is None or index >= deepstack.shape[0]:
        return h
    return h + deepstack[index, b, positions][None].to(h.dtype)


def eager_prefill(lm, embeds, vision_mask, stage, rope_positions=None, deepstack=None, context=None, caches=None):
    """The prefill one sample at a time, HF layers one by one with eager attention (their own
    attention weights), with a token-reduction stage inside chosen layers: after the layer's
    attention and residual add, before its MLP / MoE block.

    stage(b, index, layer, h [1, S, H], weights [1, heads, S, S], positions, vision) -> None where
    layer `index` runs whole, else (kept indices, new h [S', H], new vision flags).
    rope_positions: optional [3, B, S] multimodal rotary positions (gathered with the kept tokens).
    deepstack: optional [D, B, S, H] features added after layers 0..D-1 (with_deepstack).
    context(vision flags) -> a context manager around sample b's layers (e.g. eager_topkv).
    caches: a list, to which sample b's DynamicCache is appended: its layer l holds the keys and
    values of the tokens that reached layer l (so its length differs per layer after a stage).
    Returns (last-token logits [B, V], kept original positions per sample)."""
    from transformers import DynamicCache

    from fastmmoe_compile.transformers_compat import cache_kwargs  # the keyword differs across releases

    model = lm.model
    previous_attn = lm.config._attn_implementation
    lm.config._attn_implementation = "eager"  # attention weights straight from the model
    all_logits, all_kept = [], []
    try:
        for b in range(embeds.shape[0]):
            h = embeds[b:b + 1]
            positions = list(range(h.shape[1]))
            vision = vision_mask[b].tolist()
            around = contextlib.nullcontext() if context is None else context(lambda: torch.tensor(vision))
            cache = None
            if caches is not None:
                cache = DynamicCache(config=lm.config)
                caches.append(cache)
            with torch.no_grad(), around:
                for index, layer in enumerate(model.layers):
                    pos = rotary_positions(rope_positions, b, positions)
                    rope = model.rotary_emb(h, position_ids=pos)  # rotary of the kept original positions
                    seq = h.shape[1]
                    causal = torch.full((seq, seq), float("-inf")).triu(1)[None, None]
                    if not stage.runs_in(index):
                        h = layer(h, attention_mask=causal, position_ids=pos, position_embeddings=rope,
                                  **(cache_kwargs(layer, cache) if cache is not None else {}))
                        h = with_deepstack(h, deepstack, index, b, positions)
                        continue
                    attn_out, weights = layer.self_attn(
                        hidden_states=layer.input_layernorm(h), position_embeddings=rope, attention_mask=causal,
                        **(cache_kwargs(layer.self_attn, cache) if cache is not None else {}))
                    h = h + attn_out
                    keep, h0, vision = stage(b, index, layer, h, weights, positions, vision)
                    positions = [positions[i] for i in keep]
                    h = h0[None]
                    h = h + layer.mlp(layer.post_attention_layernorm(h))
                    h = with_deepstack(h, deepstack, index, b, positions)
                all_logits.append(lm.lm_head(model.norm(h))[:, -1])
                all_kept.append(positions)
    finally:
        lm.config._attn_implementation = previous_attn
    return torch.cat(all_logits), all_kept


class LayerStages:
    """A stage function for eager_prefill over {layer: settings}: step(b, layer, h, weights,
    positions, vision, settings) -> (keep, new h, new vision) in the layers of `stages`."""

    def __init__(self, stages: dict, step):
        self.stages, self.step = stages, step

    def runs_in(self, index: int) -> bool:
        return index in self.stages

    def __call__(self, b, index, layer, h, weights, positions, vision):
        return self.step(b, layer, h, weights, positions, vision, self.stages[index])


def eager_fastmmoe(lm, embeds, vision_mask, reduce_from_layer, kv, stages, rope_positions=None, deepstack=None,
                   caches=None):
    """The whole prefill per docs/fastmmoe.md sections 1-2, one sample at a time, eager attention.

    stages: {layer: (ratio, merge_ratio, window, alpha, strategy, method)}.
    rope_positions, deepstack, caches: as in eager_prefill.
    Returns (last-token logits [B, V], kept original positions per sample)."""

    def merge(b, layer, h, weights, positions, vision, settings):
        a = weights[0, :, -1, :].float().mean(dim=0)
        p = router_probabilities(lm, layer, layer.post_attention_layernorm(h))
        return reference_stage(h[0], p, a, vision, *settings)

    return eager_prefill(lm, embeds, vision_mask, LayerStages(stages, merge), rope_positions, deepstack,
                         context=lambda vision: eager_topkv(lm, vision, reduce_from_layer, kv), caches=caches)


# --- Decode after a pruned prefill (each layer attends to its own cache) -----

def eager_generate(lm, embeds, vision_mask, reduce_from_layer, kv, stages, max_new_tokens, rope_positions=None,
                   deepstack=None):
    """Greedy new tokens per sample after the FastMMoE prefill of eager_fastmmoe (same arguments):
    eager_greedy_decode after it."""
    caches = []
    logits, _ = eager_fastmmoe(lm, embeds, vision_mask, reduce_from_layer, kv, stages, rope_positions, deepstack,
                               caches=caches)
    return eager_greedy_decode(lm, logits, caches, embeds.shape[1], max_new_tokens, rope_positions)


def eager_greedy_decode(lm, logits, caches, prompt_length: int, max_new_tokens: int, rope_positions=None):
    """Greedy new tokens per sample after a pruned prefill, one sample at a time, HF layers one by one.

    logits [B, V]: the prefill's last-token logits; caches: the prefill's DynamicCache per sample
    (eager_prefill's `caches`), each layer attending to its own cache. The rotary position of the t-th
    new token is the ORIGINAL prompt length + t (with rope_positions [3, B, S]: their max + 1 + t), and
    new tokens are text tokens (plain top-K)."""
    from fastmmoe_compile.transformers_compat import cache_kwargs

    model = lm.model
    previous_attn = lm.config._attn_implementation
    lm.config._attn_implementation = "eager"
    results = []
    try:
        with torch.no_grad():
            for b, cache in enumerate(caches):
                start = prompt_length if rope_positions is None else int(rope_positions[:, b].max()) + 1
                token = int(logits[b].argmax())
                tokens = [token]
                for t in range(1, max_new_tokens):
                    h = model.embed_tokens(torch.tensor([[token]]))
                    pos = torch.tensor([[start + t - 1]])
                    rope = model.rotary_emb(h, position_ids=pos)
                    for layer in model.layers:
                        h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=rope,
                                  **cache_kwargs(layer, cache))
                    token = int(lm.lm_head(model.norm(h))[0, -1].argmax())
                    tokens.append(token)
                results.append(tokens)
    finally:
        lm.config._attn_implementation = previous_attn
    return results
