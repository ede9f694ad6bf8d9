"""DeepSeek-VL2's language configs (models/deepseek_vl2_language.py): each published variant's
language_config builds, at real size on the meta device, the transformers model that computes it;
configs no transformers module computes exactly are refused naming the field."""
import pytest
import torch

from fastmmoe_compile.models.deepseek_vl2_language import causal_lm_class, kind, text_config

BACKBONE = {"small": "DeepseekV2ForCausalLM", "base": "DeepseekV3ForCausalLM", "tiny": "DeepseekOcr2TextForCausalLM"}
# The published language_config fields (huggingface.co/deepseek-ai/deepseek-vl2{-tiny,-small,}/config.json,
# as public code quotes them; no real checkpoint is loaded here). The flagship's leaves out the layer and
# head counts: the official DeepseekV2Config's defaults (30, 32) apply.
PUBLISHED = {
    "tiny": dict(hidden_size=1280, intermediate_size=6848, num_hidden_layers=12, num_attention_heads=10,
                 num_key_value_heads=10, vocab_size=129280, max_position_embeddings=4096, n_routed_experts=64,
                 num_experts_per_tok=6, moe_intermediate_size=896, n_shared_experts=2, first_k_dense_replace=1,
                 n_group=1, topk_group=1, topk_method="greedy", q_lora_rank=None, kv_lora_rank=None,
                 qk_nope_head_dim=0, qk_rope_head_dim=0, v_head_dim=0, use_mla=False),
    "small": dict(hidden_size=2048, intermediate_size=10944, num_hidden_layers=27, num_attention_heads=16,
                  num_key_value_heads=16, vocab_size=129280, max_position_embeddings=4096, n_routed_experts=64,
                  num_experts_per_tok=6, moe_intermediate_size=1408, n_shared_experts=2, first_k_dense_replace=1,
                  n_group=1, topk_group=1, topk_method="greedy", q_lora_rank=None),
    "base": dict(hidden_size=2560, intermediate_size=12288, vocab_size=129280, max_position_embeddings=4096,
                 n_routed_experts=72, num_experts_per_tok=6, moe_intermediate_size=1536, n_shared_experts=2,
                 first_k_dense_replace=1, n_group=1, topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid",
                 norm_topk_prob=True, routed_scaling_factor=2.0, q_lora_rank=None),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_language_configs_build_the_mapped_modules(name):
    """Each published language_config builds (on the meta device, real size) the transformers model
    that computes it, with the official weight shapes."""
    config = text_config(PUBLISHED[name])
    with torch.device("meta"):
        lm = causal_lm_class(config)(config)
    layers = lm.model.layers
    assert type(lm).__name__ == BACKBONE[name]
    assert not hasattr(layers[0].mlp, "experts") and all(hasattr(layer.mlp, "experts") for layer in layers[1:])
    experts, attn = layers[1].mlp.experts, layers[0].self_attn
    assert lm.lm_head.weight.shape == (129280, config.hidden_size)
    if name == "tiny":
        assert len(layers) == 12 and attn.q_proj.weight.shape == attn.k_proj.weight.shape == (1280, 1280)
        assert attn.head_dim == 128 and experts.gate_up_proj.shape == (64, 2 * 896, 1280)
    elif name == "small":
        assert len(layers) == 27 and attn.kv_a_proj_with_mqa.weight.shape == (512 + 64, 2048)
        assert experts.gate_up_proj.shape == (64, 2 * 1408, 2048)
    else:  # the official defaults: 30 layers, 32 heads, kv_lora_rank 512, head dims 128 + 64 / 128
        assert len(layers) == 30 and attn.q_proj.weight.shape == (32 * 192, 2560)
        assert attn.kv_b_proj.weight.shape == (32 * (128 + 128), 512) and config.rope_interleave
        assert experts.gate_up_proj.shape == (72, 2 * 1536, 2560)
        gate = layers[1].mlp.gate
        assert gate.e_score_correction_bias.shape == (72,) and gate.norm_topk_prob
        assert gate.routed_scaling_factor == 2.0 and (gate.num_group, gate.topk_group) == (1, 1)
    assert layers[1].mlp.shared_experts.up_proj.weight.shape == (2 * config.moe_intermediate_size,
                                                                  config.hidden_size)


@pytest.mark.parametrize("change,message", [
    (dict(scoring_func="softmax", norm_topk_prob=True), "norm_topk_prob true with softmax"),
    (dict(topk_method="greedy"), "topk_method 'greedy' with sigmoid scoring"),
    (dict(use_mla=False), "use_mla false with sigmoid scoring"),
    (dict(n_group=4, topk_group=2, n_routed_experts=72), "topk_group < n_group with noaux_tc"),
    (dict(moe_layer_freq=2), "moe_layer_freq 2"),
    (dict(scoring_func="tanh"), "scoring_func 'tanh'"),
])
def test_configs_no_module_computes_are_refused(change, message):
    assert kind(PUBLISHED["base"]) == "mla-sigmoid"
    with pytest.raises(ValueError, match=f"unsupported DeepSeek-VL2 config: .*{message}"):
        kind({**PUBLISHED["base"], **change})
