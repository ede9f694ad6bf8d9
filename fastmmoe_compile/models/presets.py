"""Built-in models: tiny random ones (tests, the README's first command), a CPU
benchmark size, and real-size shapes that are only ever built on the meta device."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from .families import FAMILIES, VLM_FAMILIES, LoadedModel, load_vlm


@dataclass(frozen=True)
class Preset:
    name: str
    model_type: str
    kind: str  # "tiny random" | "benchmark random" | "real-size shape (meta)"
    description: str
    make_config: Callable[[], object]
    seed: int = 0
    make_processing: Callable[[], tuple] | None = None  # VLMs: (tokenizer, image processor)

    @property
    def on_meta(self) -> bool:
        return self.kind.startswith("real-size")

    def build(self, dtype: torch.dtype | None = None) -> LoadedModel:
        from transformers import AutoModelForCausalLM

        config = self.make_config()
        if self.model_type in VLM_FAMILIES:
            return self._build_vlm(config, dtype)
        family = FAMILIES[self.model_type]
        if self.on_meta:
            with torch.device("meta"):
                lm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype or torch.bfloat16)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                lm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype or torch.float32)
        return LoadedModel(lm.eval(), family, self.name)

    def _build_vlm(self, config, dtype) -> LoadedModel:
        random_model = VLM_FAMILIES[self.model_type].random_model
        if self.on_meta:
            with torch.device("meta"):
                model = random_model(config, dtype or torch.bfloat16)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                model = random_model(config, dtype or torch.float32)
        processing = self.make_processing() if self.make_processing else (None, None)
        return load_vlm(model, self.name, *processing)


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

    # DeepSeek-VL2-Small's language model (DeepSeek-V2 MoE, MLA attention): 64 experts top-6, 2 shared;
    # the vocabulary of deepseek-ai/deepseek-vl2-small's language_config (129280, not DeepSeek-V2's 102400).
    return DeepseekV2Config(
        vocab_size=129280, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, topk_method="greedy",
        routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=4096, tie_word_embeddings=False,
    )


def _lazy(module: str, function: str) -> Callable:
    """models.<module>.<function>(), imported when called: listing presets imports no model code."""
    def call():
        return getattr(importlib.import_module(f"{__package__}.{module}"), function)()

    return call


def _tiny_vlm(name: str, model_type: str, module: str, description: str) -> Preset:
    """A tiny random VLM: models.<module>'s tiny_config() and tiny_processing() (tokenizer, image processor)."""
    return Preset(name, model_type, "tiny random", description, _lazy(module, "tiny_config"),
                  make_processing=_lazy(module, "tiny_processing"))


def _qwen3_vl_30b_a3b():
    from transformers import Qwen3VLMoeConfig

    from .qwen3_vl_moe import text_causal_lm_class

    text_causal_lm_class()  # registers the text model class the backbone is built with
    # Qwen/Qwen3-VL-30B-A3B-Instruct's config.json (text: Qwen3-30B-A3B with interleaved M-RoPE; vision:
    # 27-block ViT, 16 px patches, 2x2 merge, deepstack from blocks 8, 16, 24).
    text = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                num_experts_per_tok=8, max_position_embeddings=262144, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                 "mrope_interleaved": True})
    vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2048, num_position_embeddings=2304,
                  deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh")
    return Qwen3VLMoeConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                            vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=False)


def _internvl35_30b_a3b():
    from transformers import InternVLConfig
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    # InternViT-300M-448px-V2.5 in front of Qwen3-30B-A3B; 151671 = <IMG_CONTEXT> in its tokenizer.
    vision = InternVLVisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                  intermediate_size=4096, image_size=448, patch_size=14, norm_type="layer_norm",
                                  use_mean_pooling=True, layer_scale_init_value=0.1)
    return InternVLConfig(vision_config=vision, text_config=_internvl35_30b_a3b_backbone(), image_token_id=151671,
                          downsample_ratio=0.5, tie_word_embeddings=False)


def _tiny(model_type: str) -> Preset:
    family = FAMILIES[model_type]
    return Preset(
        name="tiny-" + model_type.replace("_", "-"),
        model_type=model_type,
        kind="tiny random",
        description=f"a few layers, hidden 64, 8 experts top-4, random weights ({family.routing})",
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
        _tiny_vlm("tiny-internvl", "internvl", "internvl",
                  "InternVL layout: 2-layer InternViT (112 px tiles, 16 tokens each) + 4-layer qwen3_moe, "
                  "8 experts top-4, with a byte-level tokenizer, chat template and image processor"),
        _tiny_vlm("tiny-qwen3-vl-moe", "qwen3_vl_moe", "qwen3_vl_moe",
                  "Qwen3-VL-MoE layout: 3-block ViT (8 px patches, 2x2 merge, deepstack from 2 blocks, any image "
                  "size) + 4-layer qwen3_vl_moe_text with 3D rotary positions, 8 experts top-4, with a byte-level "
                  "tokenizer, chat template and image processor"),
        _tiny_vlm("tiny-deepseek-vl2", "deepseek_vl_v2", "deepseek_vl2",
                  "DeepSeek-VL2 layout: 2-layer SigLIP ViT (42 px tiles, 2x2 = 4 tokens each after the 2x2 "
                  "downsampling projector, up to 2x2 local tiles) + the tiny deepseek_v2, with a byte-level "
                  "tokenizer and the official image processor config"),
        Preset("tiny-deepseek-vl2-base", "deepseek_vl_v2", "tiny random",
               "DeepSeek-VL2 (the flagship) layout: tiny-deepseek-vl2's vision side + a 4-layer MLA backbone "
               "routed as the flagship (sigmoid + correction bias, noaux_tc, renormalised, x 2.0; deepseek_v3 "
               "modules), 9 experts top-3 + 2 shared", _lazy("deepseek_vl2", "tiny_base_config"),
               make_processing=_lazy("deepseek_vl2", "tiny_processing")),
        Preset("tiny-deepseek-vl2-tiny", "deepseek_vl_v2", "tiny random",
               "DeepSeek-VL2-Tiny layout: tiny-deepseek-vl2's vision side + a 4-layer multi-head-attention "
               "DeepSeek-MoE (use_mla false; deepseek_ocr2_text modules), softmax greedy, 8 experts top-3 + 2 "
               "shared", _lazy("deepseek_vl2", "tiny_tiny_config"),
               make_processing=_lazy("deepseek_vl2", "tiny_processing")),
        _tiny_vlm("tiny-glm4v-moe", "glm4v_moe", "glm4v_moe",
                  "GLM-4.5V layout: 2-layer GLM ViT (4 px patches, 2x2 merge, any image size up to 48x48 px) + "
                  "a 3-layer glm4v_moe_text (first layer dense, 8 experts top-4 in 2 groups, 3D rotary), with a "
                  "byte-level tokenizer, chat template and image processor"),
        Preset("internvl3.5-30b-a3b", "internvl", "real-size shape (meta)",
               "InternVL3.5-30B-A3B: InternViT-300M (448 px tiles, 256 tokens each) + the 30B-A3B backbone",
               _internvl35_30b_a3b),
        Preset("qwen3-vl-30b-a3b", "qwen3_vl_moe", "real-size shape (meta)",
               "Qwen3-VL-30B-A3B: 27-block ViT (16 px patches, 2x2 merge, 3 deepstack levels, any image size) + "
               "a 48-layer hidden-2048 backbone with 3D rotary, 128 experts top-8", _qwen3_vl_30b_a3b),
        Preset("deepseek-vl2-small-backbone", "deepseek_v2", "real-size shape (meta)",
               "DeepSeek-VL2-Small language backbone: 27 layers, hidden 2048, 64 experts top-6 + 2 shared",
               _deepseek_vl2_small_backbone),
    ]
})
