"""DeepSeek-V2 (the DeepSeek-VL2 backbone), DeepSeek-V3 and GLM-4.5 (glm4_moe).

V2 scores with softmax and picks greedily or group-limited, unsorted, then multiplies
by routed_scaling_factor (norm_topk_prob is ignored). V3 and GLM-4.5 score with
sigmoid, select with a correction bias and group-limited top-k, gather the unbiased
scores, renormalise, then scale. All have shared experts and dense first layers.
"""
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
