"""Bad input at every public entry point of an Engine (prefill, generate, start_decode, decode,
embed, prepare and the prompts= forms) and of `fastmmoe-compile run` is one clear error naming
the argument, what it must be and what was given (an EngineInputError: a ValueError, and for a
wrong dtype or type also a TypeError), never a torch error from inside, never a silent cast;
the CLI says it in one line with exit code 2. After each refused call the engine still works."""
import numpy as np
import pytest
import torch

from fastmmoe_compile import FastMMoEConfig, compile_model
from fastmmoe_compile.cli import main
from fastmmoe_compile.runtime.engine import EngineInputError, EngineInputTypeError
from fastmmoe_compile.runtime.generate import DecodeUnavailableError
from fastmmoe_compile.runtime.inputs import Sample, parse
from fastmmoe_compile.runtime.sampling import SamplingParams

from .conftest import write_images

IDS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))  # vocab 256, hidden 64
PROMPT = "<image>\nWhat is in the image?"


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """A text-only engine with a decode program, and its answer to IDS before any bad call."""
    engine = compile_model("tiny-qwen3-moe", FastMMoEConfig(), out=tmp_path_factory.mktemp("text") / "e",
                           backend="export", quiet=True)
    return engine, [t.tolist() for t in engine.generate(IDS, max_new_tokens=3)]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images"), {"a": (64, 80)})["a"]


@pytest.fixture(scope="module")
def vlm(tmp_path_factory, image):
    engine = compile_model("tiny-internvl", FastMMoEConfig(), out=tmp_path_factory.mktemp("vlm") / "e",
                           backend="export", quiet=True)
    return engine, engine.generate(images=str(image), prompts=PROMPT, max_new_tokens=3)


@pytest.fixture(scope="module")
def vlm_prefill_only(tmp_path_factory):
    return compile_model("tiny-internvl", FastMMoEConfig(), out=tmp_path_factory.mktemp("vlm-nodecode") / "e",
                         backend="export", quiet=True, decode=False)


def _state(e, batch=2):
    return e.start_decode(e.prefill(IDS[:batch]), 2)


TYPE, VALUE = EngineInputTypeError, EngineInputError  # TYPE is also a TypeError, both are ValueErrors

TEXT_CASES = {  # id: (call, error type, message fragment)
    # prefill
    "prefill-float-ids": (lambda e: e.prefill(IDS.float()), TYPE,
                          "input_ids must be an integer tensor [B, S] (or one sample [S]), "
                          "got a float32 tensor of shape [2, 10]"),
    "prefill-bool-ids": (lambda e: e.prefill(IDS > 5), TYPE, "input_ids must be an integer tensor"),
    "prefill-float-list-ids": (lambda e: e.prefill([[1.0, 2.0, 3.0]]), TYPE, "got a float32 tensor of shape [1, 3]"),
    "prefill-empty-ids": (lambda e: e.prefill(torch.zeros(1, 0, dtype=torch.long)), VALUE, "input_ids is empty"),
    "prefill-empty-list": (lambda e: e.prefill([]), VALUE, "input_ids is empty"),
    "prefill-3d-ids": (lambda e: e.prefill(IDS[None]), VALUE,
                       "input_ids must be [B, S] (or one sample [S]), got an int64 tensor of shape [1, 2, 10]"),
    "prefill-ragged-ids": (lambda e: e.prefill([[1, 2, 3], [1, 2]]), TYPE,
                           "samples of different lengths go to generate"),
    "prefill-string-ids": (lambda e: e.prefill("hello"), TYPE, "input_ids must be an integer tensor"),
    "prefill-ids-out-of-vocab": (lambda e: e.prefill(IDS + 1000), VALUE, "input_ids must be in [0, 256)"),
    "prefill-negative-ids": (lambda e: e.prefill(IDS - 300), VALUE, "input_ids must be in [0, 256)"),
    "prefill-one-token": (lambda e: e.prefill(IDS[:, :1]), VALUE, "at least 2 tokens"),
    "prefill-no-samples": (lambda e: e.prefill(inputs_embeds=torch.zeros(0, 4, 64)), VALUE, "no samples"),
    "prefill-int-embeds": (lambda e: e.prefill(inputs_embeds=torch.zeros(2, 10, 64, dtype=torch.long)), TYPE,
                           "inputs_embeds must be a floating-point tensor [B, S, 64], got an int64 tensor"),
    "prefill-embeds-hidden": (lambda e: e.prefill(inputs_embeds=torch.zeros(2, 10, 32)), VALUE,
                              "inputs_embeds must be [B, S, 64], got a float32 tensor of shape [2, 10, 32]"),
    "prefill-embeds-2d": (lambda e: e.prefill(inputs_embeds=torch.zeros(10, 64)), VALUE,
                          "inputs_embeds must be [B, S, 64]"),
    "prefill-ids-and-embeds": (lambda e: e.prefill(IDS, inputs_embeds=torch.zeros(2, 10, 64)), VALUE, "exactly one"),
    "prefill-nothing": (lambda e: e.prefill(), VALUE, "exactly one"),
    "prefill-float-positions": (lambda e: e.prefill(IDS, vision_positions=torch.tensor([[1.0, 2.0]] * 2)), TYPE,
                                "vision_positions must be an integer tensor [B, N] with B = 2, got a float32 tensor"),
    "prefill-positions-range": (lambda e: e.prefill(IDS, vision_positions=torch.tensor([[1, 10]] * 2)), VALUE,
                                "vision_positions must lie in [0, 10)"),
    "prefill-positions-batch": (lambda e: e.prefill(IDS, vision_positions=torch.tensor([[1, 2]] * 3)), VALUE,
                                "vision_positions must be [B, N] with B = 2, got an int64 tensor of shape [3, 2]"),
    "prefill-positions-order": (lambda e: e.prefill(IDS, vision_positions=torch.tensor([[2, 1]] * 2)), VALUE,
                                "strictly increasing"),
    "prefill-float-mask": (lambda e: e.prefill(IDS, vision_mask=torch.zeros(2, 10)), TYPE,
                           "vision_mask must be a bool tensor [B, S] = [2, 10], got a float32 tensor"),
    "prefill-int-mask": (lambda e: e.prefill(IDS, vision_mask=torch.ones(2, 10, dtype=torch.long)), TYPE,
                         "vision_mask must be a bool tensor"),
    "prefill-mask-shape": (lambda e: e.prefill(IDS, vision_mask=torch.zeros(10, dtype=torch.bool)), VALUE,
                           "vision_mask must be [B, S] = [2, 10], got a bool tensor of shape [10]"),
    "prefill-mask-counts": (lambda e: e.prefill(IDS, vision_mask=torch.eye(2, 10, dtype=torch.bool) | torch.tensor(
        [[False] * 9 + [True], [False] * 10])), VALUE, "same number of vision tokens"),
    "prefill-mask-and-positions": (lambda e: e.prefill(IDS, vision_mask=torch.zeros(2, 10, dtype=torch.bool),
                                                       vision_positions=torch.tensor([[1]] * 2)), VALUE, "not both"),
    "prefill-rope-on-text-family": (lambda e: e.prefill(IDS, rope_positions=torch.zeros(3, 2, 10, dtype=torch.long)),
                                    VALUE, "takes no rope_positions"),
    "prefill-deepstack-on-text-family": (lambda e: e.prefill(IDS, deepstack=torch.zeros(1, 2, 10, 64)), VALUE,
                                         "takes no deepstack"),
    "embed-float-ids": (lambda e: e.embed(torch.ones(2, 3)), TYPE, "input_ids must be an integer tensor"),
    # generate: a batch, one sample, or a list of samples of different lengths
    "generate-float-ids": (lambda e: e.generate(IDS.float(), max_new_tokens=2), TYPE,
                           "input_ids must be an integer tensor [S] with S >= 2 per sample, "
                           "got a float32 tensor of shape [10]"),
    "generate-float-sample": (lambda e: e.generate([IDS[0], IDS[1, :5].float()], max_new_tokens=2), TYPE,
                              "sample 1: input_ids must be an integer tensor"),
    "generate-float-flat-list": (lambda e: e.generate([1.0, 2.0, 3.0], max_new_tokens=2), TYPE,
                                 "input_ids must be an integer tensor"),
    "generate-empty-sample": (lambda e: e.generate([IDS[0], []], max_new_tokens=2), VALUE,
                              "sample 1: input_ids is empty"),
    "generate-empty-list": (lambda e: e.generate([], max_new_tokens=2), VALUE, "input_ids is empty"),
    "generate-no-samples": (lambda e: e.generate(IDS[:0], max_new_tokens=2), VALUE, "input_ids has no samples"),
    "generate-short-sample": (lambda e: e.generate([IDS[0], IDS[1, :1]], max_new_tokens=2), VALUE,
                              "sample 1: input_ids must be [S] with S >= 2 per sample"),
    "generate-ids-out-of-vocab": (lambda e: e.generate([IDS[0], IDS[1] + 256], max_new_tokens=2), VALUE,
                                  "sample 1: input_ids must be in [0, 256)"),
    "generate-int-embeds": (lambda e: e.generate(inputs_embeds=[torch.zeros(4, 64, dtype=torch.int32)],
                                                 max_new_tokens=2), TYPE,
                            "inputs_embeds must be a floating-point tensor [S, 64] per sample"),
    "generate-embeds-hidden": (lambda e: e.generate(inputs_embeds=[torch.zeros(5, 3)], max_new_tokens=2), VALUE,
                               "inputs_embeds must be [S, 64] per sample"),
    "generate-float-mask": (lambda e: e.generate([IDS[0], IDS[1, :5]], vision_mask=[torch.zeros(10), torch.zeros(5)],
                                                 max_new_tokens=2), TYPE,
                            "sample 0: vision_mask must be a bool tensor [S] = [10] per sample, got a float32 tensor"),
    "generate-float-positions": (lambda e: e.generate([IDS[0], IDS[1, :5]], vision_positions=[[1, 2], [1.0]],
                                                      max_new_tokens=2), TYPE,
                                 "sample 1: vision_positions must be an integer tensor [N] per sample"),
    "generate-positions-range": (lambda e: e.generate([IDS[0], IDS[1, :5]], vision_positions=[[1, 2], [3, 7]],
                                                      max_new_tokens=2), VALUE,
                                 "sample 1: vision_positions must lie in [0, 5)"),
    "generate-vision-count": (lambda e: e.generate([IDS[0], IDS[1, :5]], vision_positions=[[1, 2]], max_new_tokens=2),
                              VALUE, "2 samples but vision tokens for 1"),
    "generate-max-new-tokens-0": (lambda e: e.generate(IDS, max_new_tokens=0), VALUE,
                                  "max_new_tokens must be >= 1, got 0"),
    "generate-max-new-tokens-float": (lambda e: e.generate(IDS, max_new_tokens=1.5), TYPE,
                                      "max_new_tokens must be a positive int, got float 1.5"),
    "generate-max-new-tokens-str": (lambda e: e.generate(IDS, max_new_tokens="3"), TYPE,
                                    "max_new_tokens must be a positive int, got str '3'"),
    "generate-max-new-tokens-bool": (lambda e: e.generate(IDS, max_new_tokens=True), TYPE,
                                     "max_new_tokens must be a positive int"),
    "generate-stream-max-new-tokens-0": (lambda e: e.generate(IDS, max_new_tokens=0, stream=True), VALUE,
                                         "max_new_tokens must be >= 1"),  # at the call, not at the first step
    "generate-float-eos": (lambda e: e.generate(IDS, max_new_tokens=2, eos_token_id=1.0), TYPE,
                           "eos_token_id must be a token id (int) or a list of them"),
    "generate-nothing": (lambda e: e.generate(max_new_tokens=2), VALUE, "exactly one"),
    "generate-sampling-and-keywords": (lambda e: e.generate(IDS, max_new_tokens=2, seed=1,
                                                            sampling=SamplingParams(temperature=1.0)), VALUE,
                                       "pass sampling= or its settings as keywords (seed=), not both"),
    "generate-sampling-not-params": (lambda e: e.generate(IDS, max_new_tokens=2, sampling={"temperature": 1.0}),
                                     TYPE, "sampling must be a runtime.sampling.SamplingParams, got dict"),
    "generate-samples-not-samples": (lambda e: e.generate(samples=[IDS[0]], max_new_tokens=2), TYPE,
                                     "samples must be a non-empty list of runtime.inputs.Sample"),
    "prefill-samples-and-ids": (lambda e: e.prefill(IDS, samples=parse(e, IDS)), VALUE, "pass samples= alone"),
    "prefill-samples-lengths": (lambda e: e.prefill(samples=parse(e, [IDS[0], IDS[1, :5]])), VALUE,
                                "one prefill call takes samples of one length, got S = [10, 5]"),
    # start_decode and decode
    "start-decode-not-a-result": (lambda e: e.start_decode("x", 2), TYPE,
                                  "results must be a PrefillResult (from engine.prefill) or a non-empty list"),
    "start-decode-empty": (lambda e: e.start_decode([], 2), TYPE, "results must be a PrefillResult"),
    "start-decode-max-new-tokens-0": (lambda e: e.start_decode(e.prefill(IDS), 0), VALUE,
                                      "max_new_tokens must be >= 1, got 0"),
    "start-decode-max-new-tokens-float": (lambda e: e.start_decode(e.prefill(IDS), 2.0), TYPE,
                                          "max_new_tokens must be a positive int"),
    "decode-no-state": (lambda e: e.decode(None, torch.tensor([[1], [2]])), TYPE, "DecodeState"),
    "decode-float-ids": (lambda e: e.decode(_state(e), torch.tensor([[1.0], [2.0]])), TYPE,
                         "input_ids must be an integer tensor [B, 1] = [2, 1] (one token per sample), got a float32"),
    "decode-two-tokens": (lambda e: e.decode(_state(e), IDS[:, :2]), VALUE, "one token per sample"),
    "decode-batch": (lambda e: e.decode(_state(e), IDS[:1, :1]), VALUE, "one token per sample"),
    "decode-ids-out-of-vocab": (lambda e: e.decode(_state(e), torch.tensor([[1], [999]])), VALUE,
                                "input_ids must be in [0, 256)"),
    "decode-int-embeds": (lambda e: e.decode(_state(e), inputs_embeds=torch.zeros(2, 1, 64, dtype=torch.long)), TYPE,
                          "inputs_embeds must be a floating-point tensor [B, 1, H] = [2, 1, 64]"),
    "decode-embeds-shape": (lambda e: e.decode(_state(e), inputs_embeds=torch.zeros(2, 1, 32)), VALUE,
                            "one token per sample: inputs_embeds [B, 1, H] = [2, 1, 64]"),
    "decode-ids-and-embeds": (lambda e: e.decode(_state(e), IDS[:, :1], inputs_embeds=torch.zeros(2, 1, 64)), VALUE,
                              "exactly one"),
    # prompts= on a text-only engine
    "prepare-text-only": (lambda e: e.prepare(None, "hi"), VALUE, "text-only qwen3_moe"),
    "generate-prompts-text-only": (lambda e: e.generate(prompts="hi"), VALUE, "text-only qwen3_moe"),
}


def _check(call, engine, kind, fragment):
    with pytest.raises(kind) as info:
        call(engine)
    error = info.value
    assert isinstance(error, EngineInputError if kind in (TYPE, VALUE) else kind)
    assert fragment in str(error), str(error)
    assert "\n" not in str(error)
    if kind is TYPE:
        assert isinstance(error, TypeError) and isinstance(error, ValueError)


@pytest.mark.parametrize("case", list(TEXT_CASES))
def test_text_engine_refuses_bad_input_and_still_works(text, case):
    engine, expected = text
    call, kind, fragment = TEXT_CASES[case]
    _check(call, engine, kind, fragment)
    assert [t.tolist() for t in engine.generate(IDS, max_new_tokens=3)] == expected


def test_accepted_forms_still_work(text):
    """What the checks must not refuse: lists, numpy arrays, int32/uint8 ids, 1-D samples, empty
    position lists, an int / tensor eos, numpy ints as max_new_tokens."""
    engine, expected = text
    first = engine.prefill(IDS).logits
    torch.testing.assert_close(engine.prefill(IDS.tolist()).logits, first)
    torch.testing.assert_close(engine.prefill(IDS.numpy()).logits, first)
    torch.testing.assert_close(engine.prefill(IDS.to(torch.int32)).logits, first)
    torch.testing.assert_close(engine.prefill(IDS.to(torch.uint8)).logits, first)
    torch.testing.assert_close(engine.prefill(IDS[0]).logits, first[:1])
    torch.testing.assert_close(engine.prefill(IDS, vision_positions=torch.zeros(2, 0)).logits, first)
    torch.testing.assert_close(engine.prefill(inputs_embeds=engine.embed(IDS).half()).logits, first, atol=1e-2, rtol=0)
    assert [t.tolist() for t in engine.generate(list(IDS), vision_positions=[[], None],
                                                max_new_tokens=np.int64(3))] == expected
    assert [t.tolist() for t in engine.generate(IDS.tolist(), max_new_tokens=3)] == expected
    assert engine.generate(IDS[0].tolist(), max_new_tokens=3)[0].tolist() == expected[0]
    eos = expected[0][0]
    assert engine.generate(IDS, max_new_tokens=3, eos_token_id=torch.tensor([eos]))[0].tolist() == [eos]
    assert engine.generate(IDS, max_new_tokens=3, eos_token_id=[eos])[0].tolist() == [eos]
    state = engine.start_decode([engine.prefill(IDS[:1]), engine.prefill(IDS[1:])], np.int64(2))
    assert engine.decode(state, IDS[:, 0]).shape == (2, 256)  # [B] ids: one token per sample


def test_samples_and_sampling_forms(text):
    """Each form parses once into one Sample per prompt, which prefill(samples=) and generate(samples=)
    take as they are; sampling= is what its keywords are a shorthand for."""
    engine, expected = text
    samples = parse(engine, IDS)
    assert [type(s) for s in samples] == [Sample, Sample] and [s.shape for s in samples] == [(10, 0), (10, 0)]
    assert [s.vision.dtype for s in samples] == [torch.long] * 2 and samples[0].embeds.shape == (10, 64)
    assert [s.shape for s in parse(engine, [IDS[0], IDS[1, :5]], vision_positions=[[1, 2], None])] == [(10, 2), (5, 0)]
    torch.testing.assert_close(engine.prefill(samples=samples).logits, engine.prefill(IDS).logits)
    assert [t.tolist() for t in engine.generate(samples=samples, max_new_tokens=3)] == expected
    assert [t.tolist() for t in engine.generate(IDS, max_new_tokens=3, sampling=SamplingParams())] == expected
    drawn = engine.generate(IDS, max_new_tokens=3, temperature=1.0, top_k=5, seed=3)
    again = engine.generate(IDS, max_new_tokens=3, sampling=SamplingParams(temperature=1.0, top_k=5, seed=3))
    assert [t.tolist() for t in drawn] == [t.tolist() for t in again]


def test_prefill_only_engine(vlm_prefill_only):
    """One token needs no decode program; more is DecodeUnavailableError saying how to get one."""
    engine = vlm_prefill_only
    assert [len(t) for t in engine.generate(IDS, max_new_tokens=1)] == [1, 1]
    with pytest.raises(DecodeUnavailableError, match="no decode program.*recompile it without --no-decode"):
        engine.generate(IDS, max_new_tokens=2)
    with pytest.raises(DecodeUnavailableError, match="no decode program"):
        engine.start_decode(engine.prefill(IDS), 2)


VLM_CASES = {  # id: (call(engine, image), error type, message fragment)
    "prepare-empty-prompt": (lambda e, im: e.prepare(None, ""), VALUE, "prompts is empty"),
    "prepare-blank-prompt-raw": (lambda e, im: e.prepare(None, "  ", chat=False), VALUE, "prompts is empty"),
    "prepare-empty-prompt-in-list": (lambda e, im: e.prepare([im, None], [PROMPT, ""]), VALUE, "prompts[1] is empty"),
    "prepare-one-token-raw": (lambda e, im: e.prepare(None, "a", chat=False), VALUE,
                              "prompts ('a') gives 1 token(s) with chat=False; a prompt needs at least 2 tokens"),
    "prepare-prompt-not-str": (lambda e, im: e.prepare(None, 3), TYPE,
                               "prompts must be a string or a non-empty list of strings, got int 3"),
    "prepare-images-count": (lambda e, im: e.prepare([im], [PROMPT, PROMPT]), VALUE,
                             "with 2 prompts, pass images as a list of 2 entries"),
    "prepare-placeholders": (lambda e, im: e.prepare([im], "no placeholder"), VALUE, "0 <image> placeholder"),
    "prepare-not-an-image": (lambda e, im: e.prepare([3], PROMPT), VALUE, "an image must be a path"),
    "generate-prompts-max-new-tokens-0": (lambda e, im: e.generate(images=im, prompts=PROMPT, max_new_tokens=0),
                                          VALUE, "max_new_tokens must be >= 1, got 0"),
    "generate-prompts-stream-empty": (lambda e, im: e.generate(images=None, prompts="", stream=True), VALUE,
                                      "prompts is empty"),  # at the call, not at the first step
    "generate-prompts-and-ids": (lambda e, im: e.generate(IDS, prompts=PROMPT), VALUE, "prompts= .*alone"),
    "prefill-prompts-and-mask": (lambda e, im: e.prefill(images=im, prompts=PROMPT,
                                                         vision_mask=torch.zeros(1, 4, dtype=torch.bool)),
                                 VALUE, "alone"),
    "prefill-prompts-empty": (lambda e, im: e.prefill(images=None, prompts=""), VALUE, "prompts is empty"),
    "prefill-float-positions": (lambda e, im: e.prefill(IDS, vision_positions=[[1.5], [2.5]]), TYPE,
                                "vision_positions must be an integer tensor"),
}


@pytest.mark.parametrize("case", list(VLM_CASES))
def test_vlm_engine_refuses_bad_input_and_still_works(vlm, image, case):
    engine, expected = vlm
    call, kind, fragment = VLM_CASES[case]
    with pytest.raises(kind) as info:
        call(engine, str(image))
    if "*" in fragment:
        import re

        assert re.search(fragment, str(info.value)), str(info.value)
    else:
        assert fragment in str(info.value), str(info.value)
    assert isinstance(info.value, EngineInputError) and "\n" not in str(info.value)
    assert engine.generate(images=str(image), prompts=PROMPT, max_new_tokens=3) == expected


CLI_CASES = {  # id: (argv builder(paths), message fragment)
    "run-prefill-only-engine": (lambda p: ["run", p["prefill_only"], "--prompt", "hi"],
                                "has no decode program (it was compiled with --no-decode): recompile the model "
                                "without --no-decode"),
    "run-text-only-engine": (lambda p: ["run", p["text"], "--prompt", "hi"],
                             "is a text-only engine (qwen3_moe from tiny-qwen3-moe): run takes an engine compiled "
                             "from a vision-language model"),
    "run-empty-prompt-raw": (lambda p: ["run", p["vlm"], "--no-chat", "--prompt", ""], "--prompt is empty"),
    "run-empty-prompt": (lambda p: ["run", p["vlm"], "--prompt", ""], "--prompt is empty"),
    "run-one-token-prompt-raw": (lambda p: ["run", p["vlm"], "--no-chat", "--prompt", "a"],
                                 "gives 1 token(s) with chat=False"),
    "run-max-new-tokens-0": (lambda p: ["run", p["vlm"], "--prompt", "hi", "--max-new-tokens", "0"],
                             "--max-new-tokens must be >= 1, got 0"),
    "run-missing-image": (lambda p: ["run", p["vlm"], "--image", p["missing"], "--prompt", PROMPT],
                          "image file not found"),
    "run-placeholders": (lambda p: ["run", p["vlm"], "--image", p["image"], "--prompt", "no placeholder"],
                         "0 <image> placeholder"),
    "run-not-an-engine": (lambda p: ["run", p["missing"], "--prompt", "hi"], "not a directory"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_run_errors_are_one_line(text, vlm, vlm_prefill_only, image, tmp_path, case, capsys):
    paths = {"text": str(text[0].path), "vlm": str(vlm[0].path), "prefill_only": str(vlm_prefill_only.path),
             "image": str(image), "missing": str(tmp_path / "missing.png")}
    capsys.readouterr()
    assert main(CLI_CASES[case][0](paths)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastmmoe-compile: error: "), captured.err
    assert CLI_CASES[case][1] in lines[0] and "Traceback" not in captured.err
    assert captured.out == ""


def test_cli_run_still_works(vlm, image, capsys):
    engine, expected = vlm
    assert main(["run", str(engine.path), "--image", str(image), "--prompt", PROMPT, "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out == expected[0] + "\n"
