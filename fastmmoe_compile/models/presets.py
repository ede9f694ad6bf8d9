"""Built-in models: tiny random ones (tests, the README's first command), a CPU
benchmark size, and real-size shapes that are only ever built on the meta device."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .registry import FAMILIES, LoadedModel


@dataclass(frozen=True)
class Preset:
    name: str
    model_type: str
    kind: str  # "tiny random" | "benchmark random" | "real-size shape (meta)"
    description: str
    make_config: Callable[[], object]
    seed: int = 0

    @property
    def on_meta(self) -> bool:
        return self.kind.startswith("real-size")

    def build(self, dtype: torch.dtype | None = None) -> LoadedModel:
        from transformers import AutoModelForCausalLM

        config = self.make_config()
        family = FAMILIES[self.model_type]
        if self.on_meta:
            with torch.device("meta"):
                lm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype or torch.bfloat16)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                lm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype or torch.float32)
        return LoadedModel(lm.eval(), family, self.name)


def _bench_qwen3_moe():
    from transformers import Qwen3MoeConfig

    # Issue 2's CPU benchmark shape: MoE-dominated prefill.
    return Qwen3MoeConfig(
        vocab_size=4096, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512,
        num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
        num_experts=64, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=8192,
        initializer_range=0.02, tie_word_embeddings=False,
    )


def _internvl35_30b_a3b_backbone():
    from transformers import Qwen3MoeConfig

    # InternVL3.5-30B-A3B's language model (Qwen3-30B-A3B): 48 layers, 128 experts top-8.
    return Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False,
    )


def _deepseek_vl2_small_backbone():
    from transformers import DeepseekV2Config

    # DeepSeek-VL2-Small's language model (DeepSeek-V2 MoE, MLA attention): 64 experts top-6, 2 shared.
    return DeepseekV2Config(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, topk_method="greedy",
        routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=4096, tie_word_embeddings=False,
    )


def _tiny(model_type: str) -> Preset:
    family = FAMILIES[model_type]
    return Preset(
        name="tiny-" + model_type.replace("_", "-"),
        model_type=model_type,
        kind="tiny random",
        description=f"4-layer hidden-64 {model_type}, 8 experts top-4, random weights ({family.routing})",
        make_config=family.tiny_config,
    )


PRESETS: dict[str, Preset] = {p.name: p for p in [_tiny(t) for t in FAMILIES]}
PRESETS.update({
    p.name: p
    for p in [
        Preset("bench-qwen3-moe", "qwen3_moe", "benchmark random",
               "16-layer hidden-1024 qwen3_moe, 64 experts top-8 (CPU benchmark)", _bench_qwen3_moe),
        Preset("internvl3.5-30b-a3b-backbone", "qwen3_moe", "real-size shape (meta)",
               "InternVL3.5-30B-A3B language backbone: 48 layers, hidden 2048, 128 experts top-8",
               _internvl35_30b_a3b_backbone),
        Preset("deepseek-vl2-small-backbone", "deepseek_v2", "real-size shape (meta)",
               "DeepSeek-VL2-Small language backbone: 27 layers, hidden 2048, 64 experts top-6 + 2 shared",
               _deepseek_vl2_small_backbone),
    ]
})
