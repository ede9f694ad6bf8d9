"""The compiler does not depend on how the user loaded the model: a model object loaded with
eager attention (what FastV users and many eval harnesses load) compiles, with merges, into the
same engine as the same weights loaded with SDPA, and the model object is left as it was."""
import pytest
import torch

from fastmmoe_compile import FastMMoEConfig, compile_model
from fastmmoe_compile.models.presets import PRESETS
from fastmmoe_compile.transformers_compat import attention_implementation

from .conftest import prompt

MERGE = FastMMoEConfig(reduce_from_layer=2, vision_expert_ratio=0.5, merge_layers=(1, 3), keep_ratio=0.5)


def _snapshot(model):
    return {"attention": attention_implementation(model),
            "training": [m.training for m in model.modules()],
            "requires_grad": [p.requires_grad for p in model.parameters()],
            "dtype": next(model.parameters()).dtype,
            "state": {k: v.clone() for k, v in model.state_dict().items()}}


def _assert_unchanged(model, before):
    after = _snapshot(model)
    assert after["attention"] == before["attention"]
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["dtype"] == before["dtype"]
    assert after["state"].keys() == before["state"].keys()
    for name, value in before["state"].items():
        assert torch.equal(after["state"][name], value), name


def _text_model(implementation: str):
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(PRESETS["tiny-qwen3-moe"].make_config(),
                                                attn_implementation=implementation)


@pytest.mark.parametrize("backend", ["export", pytest.param("inductor", marks=pytest.mark.aoti(
    "the model object must be left unchanged by the AOTInductor path too, and its package give SDPA's logits"))])
def test_eager_loaded_model_compiles_like_sdpa_and_is_left_unchanged(backend, tmp_path):
    eager, sdpa = _text_model("eager"), _text_model("sdpa").eval()
    assert eager.config._attn_implementation == "eager"
    eager.train()  # a model straight from a training loop: flags that compiling must not change
    before = _snapshot(eager)
    # inductor: an AOTI package on disk. AOTInductor is needed: the fact is that a model loaded with
    # eager attention compiles through every backend into the SDPA model's engine. MERGE is the README's
    # engine-merge config and these are the preset's weights, so with decode the programs are the
    # README's (tests/test_readme.py, tests/test_engine.py): the session's compile cache builds them once.
    out = tmp_path / "eager" if backend == "inductor" else None
    engine = compile_model(eager, MERGE, out, backend=backend, quiet=True, decode=True)
    _assert_unchanged(eager, before)
    reference = compile_model(sdpa, MERGE, backend="export", quiet=True, decode=False)

    embeds, mask = prompt(2, 24, slice(4, 20), eager.config.hidden_size, seed=3)
    got, want = engine.prefill(inputs_embeds=embeds, vision_mask=mask), \
        reference.prefill(inputs_embeds=embeds, vision_mask=mask)
    assert torch.equal(got.kept_positions, want.kept_positions)
    assert got.kept_positions.shape[1] < 24  # the merges did prune
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    assert engine.generate(embeds[:1].argmax(-1) % 64, max_new_tokens=3)  # decode was compiled too
    _assert_unchanged(eager, before)


def test_eager_loaded_vlm_compiles_and_is_left_unchanged(tmp_path):
    """A VLM from_pretrained with eager attention (text and vision): vision encoder and backbone
    export, and the model object keeps its attention implementation and flags."""
    from transformers import AutoModelForImageTextToText

    from fastmmoe_compile.models import load_model

    source = load_model("tiny-internvl")
    source.vision.model.save_pretrained(tmp_path / "ckpt")
    eager = AutoModelForImageTextToText.from_pretrained(tmp_path / "ckpt", attn_implementation="eager")
    assert set(attention_implementation(eager).values()) == {"eager"}
    before = _snapshot(eager)
    engine = compile_model(eager, MERGE, backend="export", quiet=True, decode=False)
    _assert_unchanged(eager, before)
    reference = compile_model(source.vision.model, MERGE, backend="export", quiet=True, decode=False)
    pixels = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(engine.front_end.encoder(pixels), reference.front_end.encoder(pixels),
                               atol=1e-5, rtol=1e-5)
    embeds, mask = prompt(1, 40, slice(2, 34), eager.config.text_config.hidden_size, seed=1)
    got, want = engine.prefill(inputs_embeds=embeds, vision_mask=mask), \
        reference.prefill(inputs_embeds=embeds, vision_mask=mask)
    assert torch.equal(got.kept_positions, want.kept_positions)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
