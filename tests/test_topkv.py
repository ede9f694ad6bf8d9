"""docs/fastmmoe.md section 1 on every family: identities, the eager reference, and pairs actually computed."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastmmoe_compile import FastMMoEConfig
from fastmmoe_compile.api import rewrite

from .conftest import TINY, hf_last_logits, prompt, tiny_model
from .reference import eager_topkv

SEQ, VISION = 40, slice(6, 30)  # 24 vision tokens between text


def run(program, embeds, mask):
    positions = mask.nonzero()[:, 1].reshape(mask.shape[0], -1)
    with torch.no_grad():
        return program.module()(embeds, positions)[0]


class ExpertRows(TorchDispatchMode):
    """Records the rows of every expert GEMM: the (token, expert) pairs really computed."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.fastmmoe.grouped_mm.default:
            x, w, offs = args
            assert int(offs[-1]) == x.shape[0], "every row handed to the GEMM is computed"
            self.rows.append(x.shape[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", TINY)
def test_kv_equal_k_is_the_original_model(name):
    loaded = tiny_model(name)
    _, program, record = rewrite(loaded, FastMMoEConfig(vision_expert_ratio=1.0))
    assert not any(p["modified"] for p in record.passes)
    embeds, mask = prompt(2, SEQ, VISION, loaded.config.hidden_size)
    torch.testing.assert_close(run(program, embeds, mask), hf_last_logits(loaded, embeds), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", TINY)
def test_no_vision_tokens_is_the_original_model(name):
    loaded = tiny_model(name)
    _, program, record = rewrite(loaded, FastMMoEConfig(reduce_from_layer=0, vision_topk=1))
    assert record.passes[0]["modified"]
    embeds, mask = prompt(2, SEQ, [], loaded.config.hidden_size)
    torch.testing.assert_close(run(program, embeds, mask), hf_last_logits(loaded, embeds), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("lv,ratio", [(2, 0.5), (1, 0.25)])
def test_topkv_matches_eager_reference(name, lv, ratio):
    loaded = tiny_model(name)
    config = FastMMoEConfig(reduce_from_layer=lv, vision_expert_ratio=ratio)
    _, program, _ = rewrite(loaded, config)
    embeds, mask = prompt(2, SEQ, VISION, loaded.config.hidden_size, seed=1)
    ours = run(program, embeds, mask)
    kv = config.kv(loaded.family.top_k(loaded.config))
    with eager_topkv(loaded.lm, mask, lv, kv):
        reference = hf_last_logits(loaded, embeds)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)
    # The comparison means something only if dropping experts moved the logits.
    assert (ours - hf_last_logits(loaded, embeds)).abs().max() > 20 * 1e-4


@pytest.mark.parametrize("name", TINY)
def test_dispatch_computes_only_the_kept_pairs(name):
    loaded = tiny_model(name)
    lv = 2
    _, program, _ = rewrite(loaded, FastMMoEConfig(reduce_from_layer=lv, vision_expert_ratio=0.5))
    batch = 2
    embeds, mask = prompt(batch, SEQ, VISION, loaded.config.hidden_size)
    k = loaded.family.top_k(loaded.config)
    kv = k // 2
    n_vision = int(mask[0].sum())
    n_text = SEQ - n_vision
    counter = ExpertRows()
    with counter:
        run(program, embeds, mask)
    moe_layers = [i for i, _ in loaded.family.moe_blocks(loaded.lm)]
    per_layer = counter.rows[::2]  # gate_up then down GEMM, same rows
    assert counter.rows[1::2] == per_layer
    expected = [batch * (n_text * k + n_vision * kv) if layer >= lv else batch * SEQ * k for layer in moe_layers]
    assert per_layer == expected


def test_batch_samples_are_independent():
    loaded = tiny_model("tiny-qwen3-moe")
    _, program, _ = rewrite(loaded, FastMMoEConfig(reduce_from_layer=1, vision_expert_ratio=0.25))
    embeds, _ = prompt(2, SEQ, [], loaded.config.hidden_size, seed=3)
    positions = torch.tensor([[2, 3, 4, 5, 6, 7], [20, 21, 22, 30, 31, 39]])
    with torch.no_grad():
        together = program.module()(embeds, positions)[0]
        alone = [program.module()(embeds[i:i + 1], positions[i:i + 1])[0] for i in range(2)]
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=0)


def test_layers_below_reduce_from_layer_are_untouched():
    loaded = tiny_model("tiny-olmoe")
    _, _, record = rewrite(loaded, FastMMoEConfig(reduce_from_layer=3))
    assert [c["layer"] for c in record.passes[0]["changes"]] == [3]
    assert all(c["kv"] == 2 and c["top_k"] == 4 for c in record.passes[0]["changes"])
