"""DeepSeek-V2 (the DeepSeek-VL2-Small backbone), DeepSeek-V3 (DeepSeek-VL2's), GLM-4.5 (glm4_moe)
and DeepSeek-MoE with multi-head attention (`deepseek_ocr2_text`: DeepSeek-VL2-Tiny's backbone).

V2 and the MHA model score with softmax and pick greedily or group-limited, unsorted, then
multiply by routed_scaling_factor (norm_topk_prob is ignored). V3 and GLM-4.5 score with
sigmoid, select with a correction bias and group-limited top-k, gather the unbiased
scores, renormalise, then scale. All have shared experts and dense first layers.
"""
import functools

from transformers import DeepseekV2Config, DeepseekV3Config, Glm4MoeConfig

from .base import MoEFamily

_SMALL_MLA = dict(kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)


def tiny_v2_config() -> DeepseekV2Config:
    return DeepseekV2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1,
        topk_method="group_limited_greedy", n_group=2, topk_group=1, routed_scaling_factor=1.5,
        max_position_embeddings=4096, initializer_range=0.1, tie_word_embeddings=False, **_SMALL_MLA,
    )


def tiny_v3_config() -> DeepseekV3Config:
    return DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1, n_group=2, topk_group=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=4096,
        initializer_range=0.1, tie_word_embeddings=False, **_SMALL_MLA,
    )


def tiny_glm4_moe_config() -> Glm4MoeConfig:
    return Glm4MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1,
        n_group=2, topk_group=1, routed_scaling_factor=1.5, norm_topk_prob=True,
        max_position_embeddings=4096, initializer_range=0.1, tie_word_embeddings=False,
    )


@functools.cache
def mha_causal_lm_class() -> type:
    """transformers' DeepseekOcr2Text model (DeepSeek-V2 MoE + LlamaAttention-style MHA) + lm_head as a
    *ForCausalLM (transformers has none), registered with AutoModelForCausalLM."""
    from transformers.models.deepseek_ocr2 import modeling_deepseek_ocr2 as m

    from .grid_vlm import text_causal_lm_class

    return text_causal_lm_class(m.DeepseekOcr2TextPreTrainedModel, m.DeepseekOcr2TextModel,
                                m.DeepseekOcr2TextConfig)


def tiny_mha_config():
    from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2TextConfig

    mha_causal_lm_class()  # the text preset builds through AutoModelForCausalLM
    return DeepseekOcr2TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        n_shared_experts=2, num_experts_per_tok=4, mlp_layer_types=["dense"] + ["sparse"] * 3,
        topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
        max_position_embeddings=4096, initializer_range=0.1, tie_word_embeddings=False,
    )


DEEPSEEK_V2 = MoEFamily(
    model_type="deepseek_v2",
    routing="softmax -> greedy or group-limited top-k (unsorted) -> x routed_scaling_factor, no renormalisation",
    tiny_config=tiny_v2_config,
    experts_attr="n_routed_experts",
    shared_experts="n_shared_experts always-on experts; first_k_dense_replace dense layers",
)
def _sigmoid_routed(model_type: str, tiny_config) -> MoEFamily:
    return MoEFamily(
        model_type=model_type,
        routing="sigmoid -> +correction bias (selection only) -> group-limited top-k -> renormalise -> x scaling",
        tiny_config=tiny_config,
        experts_attr="n_routed_experts",
        shared_experts="n_shared_experts always-on experts; first_k_dense_replace dense layers",
    )


DEEPSEEK_V3 = _sigmoid_routed("deepseek_v3", tiny_v3_config)
GLM4_MOE = _sigmoid_routed("glm4_moe", tiny_glm4_moe_config)


DEEPSEEK_MHA = MoEFamily(
    model_type="deepseek_ocr2_text",
    routing="softmax -> greedy or group-limited top-k (unsorted) -> x routed_scaling_factor, no renormalisation "
            "(multi-head attention, not MLA)",
    tiny_config=tiny_mha_config,
    experts_attr="n_routed_experts",
    shared_experts="n_shared_experts always-on experts; dense layers where mlp_layer_types says so",
)
