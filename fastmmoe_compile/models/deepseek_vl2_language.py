"""DeepSeek-VL2's language model: the official `language_config` -> the transformers modules that
compute what the official modeling_deepseek.py (deepseek-ai/DeepSeek-VL2) computes.

The official code is one DeepSeek-V2 class with switches; each published variant maps onto one
transformers model whose modules do the same arithmetic and hold the same weight names:

| variant (hub id)               | official switches                                   | transformers modules      |
|--------------------------------|-----------------------------------------------------|---------------------------|
| deepseek-vl2-tiny              | use_mla false (LlamaAttention), softmax, greedy     | DeepseekOcr2Text*         |
| deepseek-vl2-small             | MLA, softmax, greedy, no renormalisation            | DeepseekV2*               |
| deepseek-vl2 (the flagship)    | MLA, sigmoid, noaux_tc + e_score_correction_bias,   | DeepseekV3* (rope         |
|                                | norm_topk_prob, routed_scaling_factor 2.0           |  interleaved)             |

Why these are exact:
- MHA (use_mla false): the official layer is transformers' LlamaAttention (q/k/v/o, bias =
  attention_bias, head_dim = hidden / heads, rotate-half RoPE on all head dims, 1/sqrt(head_dim)):
  DeepseekOcr2TextAttention is that module; its MoE is DeepSeek-V2's (softmax, greedy or
  group-limited top-k, x routed_scaling_factor, no renormalisation), dense layers first.
- MLA: the official apply_rotary_pos_emb de-interleaves q_pe/k_pe (view d/2 x 2, transpose) then
  rotates half, which is DeepseekV2's complex product and DeepseekV3's rope_interleave=True.
- noaux_tc: the official gate selects on sigmoid + correction bias, gathers the unbiased scores,
  divides by their sum + 1e-20 when top_k > 1, then scales: DeepseekV3TopkRouter. The official code
  masks left-out groups with 0 where transformers uses -inf, so configs that leave groups out
  (topk_group < n_group) are refused; the flagship has n_group = topk_group = 1.
Missing fields take the official DeepseekV2Config's defaults (not transformers'): the flagship's
language_config gives neither num_hidden_layers (30) nor num_attention_heads (32).
"""
from __future__ import annotations

from ..errors import UnsupportedModelError

# deepseek_vl2/models/configuration_deepseek.py, DeepseekV2Config.__init__ defaults.
OFFICIAL_DEFAULTS = dict(
    vocab_size=102400, hidden_size=4096, intermediate_size=11008, moe_intermediate_size=1407, num_hidden_layers=30,
    num_attention_heads=32, num_key_value_heads=32, n_shared_experts=None, n_routed_experts=None,
    routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
    qk_nope_head_dim=128, topk_method="greedy", n_group=None, topk_group=None, num_experts_per_tok=None,
    moe_layer_freq=1, first_k_dense_replace=0, norm_topk_prob=False, scoring_func="softmax", hidden_act="silu",
    max_position_embeddings=2048, initializer_range=0.02, rms_norm_eps=1e-6, pad_token_id=None,
    bos_token_id=100000, eos_token_id=100001, tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=None,
    attention_bias=False, attention_dropout=0.0, use_mla=True,
)
_COMMON = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
           "num_attention_heads", "num_key_value_heads", "n_shared_experts", "n_routed_experts",
           "routed_scaling_factor", "num_experts_per_tok", "first_k_dense_replace", "hidden_act",
           "max_position_embeddings", "initializer_range", "rms_norm_eps", "pad_token_id", "bos_token_id",
           "eos_token_id", "tie_word_embeddings", "attention_bias", "attention_dropout")
_MLA = ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim")


def kind(lang: dict) -> str:
    """"mla-softmax" (Small), "mla-sigmoid" (the flagship) or "mha-softmax" (Tiny) for an official
    language_config (defaults filled in); ValueError naming every field this mapping cannot compute."""
    c = {**OFFICIAL_DEFAULTS, **lang}
    scoring, method = c["scoring_func"], c["topk_method"]
    bad = {
        "language_config.n_routed_experts null (a dense model)": c["n_routed_experts"] is None,
        f"language_config.scoring_func {scoring!r}": scoring not in ("softmax", "sigmoid"),
        f"language_config.moe_layer_freq {c['moe_layer_freq']!r} (only 1)": c["moe_layer_freq"] != 1,
        f"language_config.topk_method {method!r} with softmax scoring":
            scoring == "softmax" and method not in ("greedy", "group_limited_greedy"),
        "language_config.norm_topk_prob true with softmax scoring (transformers' DeepSeek-V2 router does "
        "not renormalise)": scoring == "softmax" and bool(c["norm_topk_prob"]),
        f"language_config.topk_method {method!r} with sigmoid scoring (only noaux_tc)":
            scoring == "sigmoid" and method != "noaux_tc",
        "language_config.use_mla false with sigmoid scoring": scoring == "sigmoid" and c["use_mla"] is False,
        "language_config.topk_group < n_group with noaux_tc (group masking differs)":
            method == "noaux_tc" and int(c["topk_group"] or 0) < int(c["n_group"] or 0),
        "language_config.n_group/topk_group null with noaux_tc":
            method == "noaux_tc" and (c["n_group"] is None or c["topk_group"] is None),
        "language_config.norm_topk_prob with num_experts_per_tok 1 (the official gate skips it)":
            scoring == "sigmoid" and bool(c["norm_topk_prob"]) and c["num_experts_per_tok"] == 1,
        "language_config.rope_scaling (only plain RoPE without MLA or with sigmoid routing)":
            c["rope_scaling"] is not None and (c["use_mla"] is False or scoring == "sigmoid"),
    }
    problems = [name for name, is_bad in bad.items() if is_bad]
    if problems:
        raise UnsupportedModelError(f"unsupported DeepSeek-VL2 config: {', '.join(problems)}")
    return ("mla-" if c["use_mla"] is not False else "mha-") + scoring


def text_config(lang: dict):
    """The transformers config of the module set `kind(lang)` names (ValueError as kind())."""
    variant = kind(lang)
    c = {**OFFICIAL_DEFAULTS, **lang}
    common = {k: c[k] for k in _COMMON}
    rope = {"rope_type": "default", "rope_theta": float(c["rope_theta"])}
    if variant == "mla-softmax":
        from transformers import DeepseekV2Config

        extra = {"rope_scaling": c["rope_scaling"]} if c["rope_scaling"] is not None else {"rope_parameters": rope}
        config = DeepseekV2Config(**common, **{k: c[k] for k in _MLA}, topk_method=c["topk_method"],
                                  n_group=c["n_group"], topk_group=c["topk_group"], **extra)
    elif variant == "mla-sigmoid":
        from transformers import DeepseekV3Config

        config = DeepseekV3Config(**common, **{k: c[k] for k in _MLA}, n_group=int(c["n_group"]),
                                  topk_group=int(c["topk_group"]), norm_topk_prob=bool(c["norm_topk_prob"]),
                                  rope_parameters=rope, rope_interleave=True)
    else:
        from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2TextConfig

        layers, dense = int(c["num_hidden_layers"]), int(c["first_k_dense_replace"])
        config = DeepseekOcr2TextConfig(**common, topk_method=c["topk_method"], n_group=c["n_group"],
                                        topk_group=c["topk_group"], rope_parameters=rope,
                                        mlp_layer_types=["dense"] * dense + ["sparse"] * (layers - dense))
    config._attn_implementation = "sdpa"
    return config


def causal_lm_class(config) -> type:
    """The *ForCausalLM class for text_config()'s result."""
    import transformers

    if config.model_type == "deepseek_ocr2_text":
        from .deepseek import mha_causal_lm_class

        return mha_causal_lm_class()
    return {"deepseek_v2": transformers.DeepseekV2ForCausalLM,
            "deepseek_v3": transformers.DeepseekV3ForCausalLM}[config.model_type]


# --- tiny language configs in each variant's official form (tests, presets) --------------------
def tiny_language(variant: str, vocab_size: int, bos: int, eos: int) -> dict:
    """A tiny official-layout language_config of one published variant ("small", "base", "tiny"),
    every structural field of the published config kept (routing, attention kind, dense first layer,
    shared experts, null LoRA ranks), sizes shrunk."""
    shared = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2,
                  first_k_dense_replace=1, max_position_embeddings=4096, rms_norm_eps=1e-6,
                  initializer_range=0.1, tie_word_embeddings=False, rope_theta=10000.0, moe_layer_freq=1,
                  bos_token_id=bos, eos_token_id=eos, model_type="deepseek_v2")
    if variant == "small":  # deepseek-vl2-small: MLA, softmax, greedy; here group-limited to test that path too
        return {**shared, "n_shared_experts": 1, "n_routed_experts": 8, "num_experts_per_tok": 4,
                "topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1,
                "routed_scaling_factor": 1.5, "kv_lora_rank": 16, "q_lora_rank": None, "qk_nope_head_dim": 16,
                "qk_rope_head_dim": 8, "v_head_dim": 16, "use_mla": True, "scoring_func": "softmax",
                "norm_topk_prob": False}
    if variant == "base":  # deepseek-vl2: 72 experts top-6 -> 9 top-3
        return {**shared, "n_routed_experts": 9, "num_experts_per_tok": 3, "topk_method": "noaux_tc",
                "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.0, "n_group": 1,
                "topk_group": 1, "q_lora_rank": None, "kv_lora_rank": 16, "qk_nope_head_dim": 16,
                "qk_rope_head_dim": 8, "v_head_dim": 16}
    if variant == "tiny":  # deepseek-vl2-tiny: 64 experts top-6 -> 8 top-3, MHA
        return {**shared, "n_routed_experts": 8, "num_experts_per_tok": 3, "topk_method": "greedy", "n_group": 1,
                "topk_group": 1, "q_lora_rank": None, "kv_lora_rank": None, "qk_nope_head_dim": 0,
                "qk_rope_head_dim": 0, "v_head_dim": 0, "use_mla": False}
    raise ValueError(f"unknown DeepSeek-VL2 variant {variant!r} (small, base, tiny)")
