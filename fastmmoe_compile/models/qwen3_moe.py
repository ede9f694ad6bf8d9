"""Qwen3-MoE: the InternVL3.5-30B-A3B and Qwen3-VL-MoE language backbone."""
from transformers import Qwen3MoeConfig

from .base import MoEFamily


def tiny_config() -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=8, num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=4096,
        initializer_range=0.1, tie_word_embeddings=False,
    )


FAMILY = MoEFamily(
    model_type="qwen3_moe",
    routing="softmax -> top-k (sorted) -> renormalise if norm_topk_prob",
    tiny_config=tiny_config,
)
