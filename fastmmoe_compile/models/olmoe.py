"""OLMoE: 64 experts top-8, no shared experts."""
from transformers import OlmoeConfig

from .base import MoEFamily


def tiny_config() -> OlmoeConfig:
    return OlmoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=4,
        norm_topk_prob=False, max_position_embeddings=4096, initializer_range=0.1,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


FAMILY = MoEFamily(
    model_type="olmoe",
    routing="softmax -> top-k -> renormalise if norm_topk_prob (off by default)",
    tiny_config=tiny_config,
)
