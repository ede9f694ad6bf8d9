"""Family inputs as specs (runtime/specs.py): inputs declared in one place (this file) go
through export, the passes, the engine dir's manifest, the runtime's checks, batching and
decode, with no other file touched; the logits and tokens match the eager reference fed the
same values. Also: a spec's manifest form, and manifests written before specs existed."""
import dataclasses
import json

import pytest
import torch

from fastmmoe_compile import FastMMoEConfig, compile_model
from fastmmoe_compile.models.base import MoEFamily
from fastmmoe_compile.runtime import load_engine
from fastmmoe_compile.runtime.engine import EngineFormatError, EngineInputError, EngineInputTypeError
from fastmmoe_compile.runtime.specs import InputSpec, InputSpecError, known_names, specs_of

from . import reference
from .conftest import prompt, tiny_model

# The declarations (this block is all a family adds): per-token rotary positions [B, S], fed to the
# decoder as position_ids, 0..S-1 when absent, decode continuing after the largest; and per-token
# features [B, S, H] added to the residual stream after decoder layer LATE, zero when absent, prefill
# only. Merging at layer 2 < LATE, the features must follow the kept tokens. No front end registers
# either name: the runtime learns them from the manifest alone.
TOKEN_POSITIONS = InputSpec("token_positions", ("B", "S"), "int64", absent="arange", decode="max+1",
                            doc="rotary position of each token")
LATE_BIAS = InputSpec("late_bias", ("B", "S", "H"), "float", sizes=(("H", "hidden_size"),), absent="zeros",
                      doc="features added after decoder layer 3")
LATE = 3


@dataclasses.dataclass(frozen=True)
class FakeFamily(MoEFamily):
    def run_decoder(self, lm, inputs_embeds, position_ids=None, token_positions=None, late_bias=None):
        positions = token_positions if token_positions is not None else position_ids
        if late_bias is None:  # decode steps
            return super().run_decoder(lm, inputs_embeds, positions)
        hook = self.decoder(lm).layers[LATE].register_forward_hook(lambda m, a, out: out + late_bias.to(out.dtype))
        try:
            return super().run_decoder(lm, inputs_embeds, positions)
        finally:
            hook.remove()


CONFIG = FastMMoEConfig(reduce_from_layer=1, vision_expert_ratio=0.5, merge_layers=(2,), keep_ratio=0.5,
                        merge_ratio=0.25, window=3, alpha=0.4)
REFERENCE_ARGS = (1, 2, {2: (0.5, 0.25, 3, 0.4, "hybrid", "mlerp")})  # reduce_from_layer, Kv, stages
SEQ, VISION = 14, slice(3, 11)
# Contiguous per sample (transformers reads position steps other than 1 as packed sequences).
POSITIONS = torch.stack([torch.arange(SEQ), 40 + torch.arange(SEQ)])


@pytest.fixture(scope="module")
def fake_loaded():
    base = tiny_model("tiny-qwen3-moe")
    fields = {f.name: getattr(base.family, f.name) for f in dataclasses.fields(base.family)}
    family = FakeFamily(**{**fields, "input_specs": (TOKEN_POSITIONS, LATE_BIAS)})
    return dataclasses.replace(base, family=family, source="tiny-qwen3-moe + token_positions, late_bias")


@pytest.fixture(scope="module")
def engine_dir(fake_loaded, tmp_path_factory):
    out = tmp_path_factory.mktemp("specs") / "engine"
    compile_model(fake_loaded, CONFIG, out=out, backend="export", quiet=True)
    return out


@pytest.fixture
def with_positions(monkeypatch):
    """The eager reference's rotary positions from [1, B, S] positions (it reads [3, B, S] M-RoPE ones)."""
    monkeypatch.setattr(reference, "rotary_positions", lambda rope, b, kept: torch.tensor(kept)[None]
                        if rope is None else rope[0, b, kept][None])


def late(bias):
    """late_bias [B, S, H] as the reference's per-layer features [D, B, S, H] (added after layers 0..D-1)."""
    return torch.cat([torch.zeros(LATE, *bias.shape), bias[None]])


def test_manifest_and_program_carry_the_specs(engine_dir):
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    assert manifest["model"]["extra_inputs"] == ["token_positions", "late_bias"]
    assert manifest["model"]["input_specs"] == [TOKEN_POSITIONS.to_dict(), LATE_BIAS.to_dict()]
    program = torch.export.load(str(engine_dir / "backbone.pt2"))
    assert program.graph_signature.user_inputs == ("inputs_embeds", "vision_positions", "token_positions",
                                                   "late_bias")
    assert load_engine(engine_dir).input_specs == (TOKEN_POSITIONS, LATE_BIAS)
    assert not {"token_positions", "late_bias"} & set(known_names())


def test_prefill_and_generate_follow_the_declared_inputs(engine_dir, fake_loaded, with_positions):
    engine = load_engine(engine_dir)
    lm = fake_loaded.lm
    embeds, mask = prompt(2, SEQ, VISION, fake_loaded.config.hidden_size, seed=3)
    bias = torch.randn(2, SEQ, fake_loaded.config.hidden_size, generator=torch.Generator().manual_seed(4))
    result = engine.prefill(inputs_embeds=embeds, vision_mask=mask, token_positions=POSITIONS, late_bias=bias)
    logits, kept = reference.eager_fastmmoe(lm, embeds, mask, *REFERENCE_ARGS, rope_positions=POSITIONS[None],
                                            deepstack=late(bias))
    assert result.kept_positions.tolist() == kept and result.kept_positions.shape[1] < SEQ  # the merge ran
    torch.testing.assert_close(result.logits, logits, atol=1e-4, rtol=0)
    assert result.next_positions.tolist() == (POSITIONS.amax(dim=1) + 1).tolist() == [SEQ, 40 + SEQ]

    # Absent: plain positions 0..S-1 and no features (the plain model); the features change the answer.
    plain = engine.prefill(inputs_embeds=embeds, vision_mask=mask)
    plain_logits, _ = reference.eager_fastmmoe(lm, embeds, mask, *REFERENCE_ARGS)
    torch.testing.assert_close(plain.logits, plain_logits, atol=1e-4, rtol=0)
    assert plain.next_positions.tolist() == [SEQ, SEQ]
    assert (plain_logits - logits).abs().max() > 20 * 1e-4

    # generate: a batch, and samples of different lengths, each input a list of per-sample tensors.
    tokens = engine.generate(inputs_embeds=embeds, vision_mask=mask, token_positions=POSITIONS, late_bias=bias,
                             max_new_tokens=4)
    expected = reference.eager_generate(lm, embeds, mask, *REFERENCE_ARGS, 4, rope_positions=POSITIONS[None],
                                        deepstack=late(bias))
    assert [t.tolist() for t in tokens] == expected
    short = 11
    tokens = engine.generate(inputs_embeds=[embeds[0], embeds[1, :short]], vision_mask=[mask[0], mask[1, :short]],
                             token_positions=[POSITIONS[0], POSITIONS[1, :short]],
                             late_bias=[bias[0], bias[1, :short]], max_new_tokens=3)
    assert tokens[0].tolist() == expected[0][:3]
    assert tokens[1].tolist() == reference.eager_generate(
        lm, embeds[1:, :short], mask[1:, :short], *REFERENCE_ARGS, 3, rope_positions=POSITIONS[None, 1:, :short],
        deepstack=late(bias[1:, :short]))[0]


def test_the_declared_inputs_are_checked(engine_dir):
    engine = load_engine(engine_dir)
    embeds = torch.zeros(2, SEQ, engine.info["hidden_size"])
    with pytest.raises(EngineInputError, match=r"token_positions must be \[2, 14\] \(\[B, S\]\), got an int64 tensor "
                                               r"of shape \[2, 5\]"):
        engine.prefill(inputs_embeds=embeds, token_positions=POSITIONS[:, :5])
    with pytest.raises(EngineInputTypeError, match="token_positions must be an integer tensor"):
        engine.prefill(inputs_embeds=embeds, token_positions=POSITIONS.float())
    with pytest.raises(EngineInputError, match=r"late_bias must be \[2, 14, 64\] \(\[B, S, H\]\)"):
        engine.prefill(inputs_embeds=embeds, late_bias=torch.zeros(2, SEQ, 32))
    with pytest.raises(EngineInputError, match=r"engine takes no rope_positions \(its backbone inputs: "
                                               r"inputs_embeds, vision_positions, token_positions, late_bias\)"):
        engine.prefill(inputs_embeds=embeds, rope_positions=torch.zeros(3, 2, SEQ, dtype=torch.long))
    with pytest.raises(EngineInputError, match=r"token_positions must be \[14\] \(\[S\]\) per sample"):
        engine.generate(inputs_embeds=embeds, token_positions=[POSITIONS[0], POSITIONS[1, :4]], max_new_tokens=1)


def test_manifest_without_specs(engine_dir, tmp_path):
    # A format-2 manifest from before input specs: known names are the front ends' specs...
    from fastmmoe_compile.models.glm4v_moe import TEXT_FAMILY as GLM
    from fastmmoe_compile.models.qwen3_vl_moe import TEXT_FAMILY as QWEN

    for family in (QWEN, GLM):
        assert specs_of({"extra_inputs": list(family.extra_inputs)}) == family.input_specs
    # ... and an input only a manifest's specs could declare is a clear error without them.
    import shutil

    shutil.copytree(engine_dir, tmp_path / "e")
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    del manifest["model"]["input_specs"]
    (tmp_path / "e" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineFormatError, match="manifest field model.extra_inputs is \\['token_positions', "
                                                "'late_bias'\\]; expected a list of distinct names from "
                                                "rope_positions, deepstack"):
        load_engine(tmp_path / "e")


def test_spec_round_trip_and_refusals():
    for spec in (TOKEN_POSITIONS, LATE_BIAS, *specs_of({"extra_inputs": list(known_names())})):
        assert InputSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(InputSpecError, match="must hold 'B' and 'S' once each"):
        InputSpec("x", ("B",), "int64")
    with pytest.raises(InputSpecError, match="dim 'D' is neither B, S, a size >= 0 nor named in sizes"):
        InputSpec("x", ("D", "B", "S"), "float")
    with pytest.raises(InputSpecError, match="decode 'max\\+1' needs int64 positions"):
        InputSpec("x", ("B", "S"), "float", decode="max+1")
    with pytest.raises(InputSpecError, match="name 'inputs_embeds' is not a new identifier"):
        InputSpec("inputs_embeds", ("B", "S"), "float")
