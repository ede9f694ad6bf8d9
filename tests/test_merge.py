"""docs/fastmmoe.md section 2 and the FastV baseline: against the HF model, an independent eager
reference (tests/reference.py), and the edge cases docs/fastmmoe.md names."""
import pytest
import torch

from fastmmoe_compile import ConfigError, FastMMoEConfig
from fastmmoe_compile.api import rewrite
from fastmmoe_compile.config import FastVConfig, config_preset
from fastmmoe_compile.lower.inductor import decompose
from fastmmoe_compile.passes.token_reduction import TokenReductionError

from .conftest import hf_last_logits, prompt, tiny_model
from .reference import eager_fastmmoe

SEQ = 40


def run(program, embeds, positions):
    with torch.no_grad():
        return program.module()(embeds, positions)


def positions_of(mask):
    return mask.nonzero()[:, 1].reshape(mask.shape[0], -1)


@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "tiny-deepseek-v2"])
def test_keep_ratio_one_is_the_original_model(name):
    loaded = tiny_model(name)
    _, program, record = rewrite(loaded, FastMMoEConfig(vision_expert_ratio=1.0, merge_layers=(1, 3), keep_ratio=1.0))
    embeds, mask = prompt(2, SEQ, slice(6, 30), loaded.config.hidden_size)
    logits, kept = run(program, embeds, positions_of(mask))
    torch.testing.assert_close(logits, hf_last_logits(loaded, embeds), atol=1e-5, rtol=0)
    assert torch.equal(kept, torch.arange(SEQ).expand(2, SEQ))


CASES = [  # (family, strategy, method)
    ("tiny-qwen3-moe", "hybrid", "mlerp"),
    ("tiny-qwen3-moe", "routing", "mean"),
    ("tiny-qwen3-moe", "attention", "mlerp"),
    ("tiny-deepseek-v2", "hybrid", "mean"),
    ("tiny-deepseek-v2", "routing", "mlerp"),
    ("tiny-deepseek-v2", "attention", "mean"),
    ("tiny-glm4-moe", "hybrid", "mlerp"),  # sigmoid routing distributions
]


@pytest.mark.parametrize("name,strategy,method", CASES)
def test_merge_matches_eager_reference(name, strategy, method):
    loaded = tiny_model(name)
    config = FastMMoEConfig(reduce_from_layer=2, vision_expert_ratio=0.5, merge_layers=(1, 3), keep_ratio=0.25,
                            merge_ratio=0.25, window=3, alpha=0.4, strategy=strategy, merge_method=method)
    _, program, _ = rewrite(loaded, config)
    embeds, mask = prompt(2, SEQ, slice(6, 30), loaded.config.hidden_size, seed=11)
    logits, kept = run(program, embeds, positions_of(mask))
    stage = (0.5, 0.25, 3, 0.4, strategy, method)
    ref_logits, ref_kept = eager_fastmmoe(loaded.lm, embeds, mask, 2, 2, {1: stage, 3: stage})
    assert kept.tolist() == ref_kept
    assert kept.shape == (2, SEQ - 24 + 6)  # 24 vision tokens -> 12 -> 6
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    assert (logits - hf_last_logits(loaded, embeds)).abs().max() > 20 * 1e-4


@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "tiny-deepseek-v3"])
def test_fastv_matches_eager_reference(name):
    loaded = tiny_model(name)
    _, program, record = rewrite(loaded, FastVConfig(prune_layer=2, keep_ratio=0.5))
    assert record.passes[0]["pass"] == "fastv"
    embeds, mask = prompt(2, SEQ, slice(4, 36), loaded.config.hidden_size, seed=5)
    logits, kept = run(program, embeds, positions_of(mask))
    ref_logits, ref_kept = eager_fastmmoe(loaded.lm, embeds, mask, 99, 4,
                                          {2: (0.5, 0.0, 2, 0.0, "attention", "mean")})
    assert kept.tolist() == ref_kept
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)


def test_batch_samples_select_their_own_tokens():
    loaded = tiny_model("tiny-qwen3-moe")
    _, program, _ = rewrite(loaded, FastMMoEConfig(merge_layers=(1, 2), keep_ratio=0.5, merge_ratio=0.3))
    embeds, _ = prompt(2, SEQ, [], loaded.config.hidden_size, seed=2)
    positions = torch.stack([torch.arange(3, 23), torch.arange(15, 35)])  # two images at different places
    together_logits, together_kept = run(program, embeds, positions)
    for b in range(2):
        alone_logits, alone_kept = run(program, embeds[b:b + 1], positions[b:b + 1])
        torch.testing.assert_close(together_logits[b:b + 1], alone_logits, atol=1e-5, rtol=0)
        assert torch.equal(together_kept[b:b + 1], alone_kept)
    # The graph Inductor gets (routing ops decomposed) must take batch 1 too: re-tracing it
    # must not pin the export's example batch of 2.
    decomposed = decompose(program).module()
    with torch.no_grad():
        alone_logits, alone_kept = decomposed(embeds[1:], positions[1:])
    torch.testing.assert_close(together_logits[1:], alone_logits, atol=1e-5, rtol=0)
    assert torch.equal(together_kept[1:], alone_kept)


@pytest.mark.parametrize("vision,expected_vision_after", [
    ([], 0),                      # no vision tokens: nothing to do
    ([7], 1),                     # a single vision token: N <= T, the stage is a no-op
    ([7, 8], 1),                  # N < window: no window to merge, prune to T = 1
    (list(range(30, 40)), 5),     # vision tokens at the very end of the sequence
])
def test_edge_cases(vision, expected_vision_after):
    loaded = tiny_model("tiny-olmoe")
    config = FastMMoEConfig(merge_layers=(3,), keep_ratio=0.5, merge_ratio=0.5)  # merge at the last layer
    _, program, _ = rewrite(loaded, config)
    embeds, mask = prompt(1, SEQ, vision, loaded.config.hidden_size, seed=4)
    logits, kept = run(program, embeds, positions_of(mask))
    assert kept.shape[1] == SEQ - len(vision) + expected_vision_after
    stage = (0.5, 0.5, 3, 0.5, "hybrid", "mlerp")
    ref_logits, ref_kept = eager_fastmmoe(loaded.lm, embeds, mask, 2, 2, {3: stage})
    assert kept.tolist() == ref_kept
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    if len(vision) <= 1:
        _, plain, _ = rewrite(loaded, FastMMoEConfig())
        torch.testing.assert_close(logits, run(plain, embeds, positions_of(mask))[0], atol=1e-5, rtol=0)


def test_bad_merge_layers_are_clear_errors():
    with pytest.raises(ConfigError, match=r"merge_layers \[4\] out of range"):
        rewrite(tiny_model("tiny-qwen3-moe"), FastMMoEConfig(merge_layers=(2, 4)))
    with pytest.raises(TokenReductionError, match="merge layer 0 has no routed-MoE router"):
        rewrite(tiny_model("tiny-deepseek-v2"), FastMMoEConfig(merge_layers=(0,)))
    with pytest.raises(ConfigError, match="prune_layer=7 is out of range"):
        rewrite(tiny_model("tiny-mixtral"), FastVConfig(prune_layer=7))


def test_authors_presets():
    c = config_preset("internvl3.5-30b-a3b", keep_ratio=0.5)
    assert c.merge_layers == (5, 8, 12) and c.merge_ratio == 0.025 and c.alpha == 0.5 and c.keep_ratio == 0.5
    d = config_preset("deepseek-vl2-small", keep_ratio=0.25)
    assert d.merge_layers == (2, 5, 8) and d.merge_ratio == 0.05 and d.alpha == 0.3
    with pytest.raises(ConfigError, match="unknown config preset"):
        config_preset("llava")
