"""Mixtral: 8 experts top-2, top-K weights always renormalised."""
from transformers import MixtralConfig

from .base import MoEFamily


def tiny_config() -> MixtralConfig:
    return MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=4,
        max_position_embeddings=4096, initializer_range=0.1, tie_word_embeddings=False,
    )


FAMILY = MoEFamily(
    model_type="mixtral",
    routing="softmax -> top-k -> always renormalise",
    tiny_config=tiny_config,
    experts_attr="num_local_experts",
)
