"""Qwen2-MoE (Qwen1.5-MoE / Qwen2-57B-A14B): a gated shared expert beside the routed ones."""
from transformers import Qwen2MoeConfig

from .base import MoEFamily


def tiny_config() -> Qwen2MoeConfig:
    return Qwen2MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=4, norm_topk_prob=False,
        max_position_embeddings=4096, initializer_range=0.1, tie_word_embeddings=False,
    )


FAMILY = MoEFamily(
    model_type="qwen2_moe",
    routing="softmax -> top-k -> renormalise if norm_topk_prob (off by default)",
    tiny_config=tiny_config,
    shared_experts="one shared expert, sigmoid-gated",
)
