"""The lmms-eval adapter: a tiny-internvl engine (export backend) on a tiny local dataset the
test writes (MMMU / OCRBench / ScienceQA-style questions, images as PIL images in several
modes), through lmms-eval's own model registry and Instance requests. Answers must be the
engine's own generate_text; loglikelihood must equal a prefill-only recomputation."""
import numpy as np
import pytest
import torch
from PIL import Image

from fastmmoe_compile import FastMMoEConfig, compile_model
from fastmmoe_compile.integrations.requests import answer, continuation_logprob, truncate_at, with_placeholders
from fastmmoe_compile.runtime.multimodal import generate_text

TASK, SPLIT = "tiny_vqa", "test"
MAX_NEW = 5


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("lmms") / "engine"
    return compile_model("tiny-internvl", FastMMoEConfig(reduce_from_layer=2, vision_expert_ratio=0.5), out,
                         backend="export", quiet=True)


@pytest.fixture(scope="module")
def docs():
    """Documents as lmms-eval tasks hold them: an image field read by doc_to_visual."""
    rng = np.random.RandomState(0)

    def image(h, w, mode):
        return Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")).convert(mode)

    return [
        {"image": [image(60, 140, "RGBA")], "question": "What is written in the image?"},  # OCRBench-like
        {"image": [image(90, 90, "RGB")],
         "question": "<image 1> Which option fits? A. cat B. dog\nAnswer with the option's letter."},  # MMMU-like
        {"image": [image(50, 50, "L")], "question": "<image>\nQuestion: Which is warmer?\n(A) ice (B) tea"},
        {"image": [], "question": "Context: no figure. Which planet is largest? (A) Mars (B) Jupiter"},  # text only
    ]


def doc_to_visual(doc):
    return doc["image"]


def test_request_helpers():
    assert with_placeholders("Describe it.", 2) == "<image>\n<image>\nDescribe it."
    assert with_placeholders("<image>\nDescribe it.", 1) == "<image>\nDescribe it."
    assert with_placeholders("<image> vs <image>?", 1) == "<image>\n vs ?"  # a mismatch: re-placed
    assert with_placeholders("Text only.", 0) == "Text only."
    assert truncate_at("A. cat\n\nB", ["\n\n", "B"]) == "A. cat"
    assert truncate_at("A. cat", "dog") == "A. cat"
    assert truncate_at("A. cat", None) == "A. cat"


def test_answer_is_the_engines_generate_text(engine, docs):
    for doc in docs:
        images = [im.convert("RGB") for im in doc["image"]]
        expected = generate_text(engine, images, with_placeholders(doc["question"], len(images)), MAX_NEW)[0]
        assert answer(engine, doc["question"], doc["image"], MAX_NEW) == expected


def _lmms(engine, docs, **args):
    pytest.importorskip("lmms_eval", reason="lmms-eval not installed: pip install --no-deps lmms-eval pytz loguru")
    from lmms_eval.models import get_model

    arg_string = ",".join([f"engine={engine.path}"] + [f"{k}={v}" for k, v in args.items()])
    lm = get_model("fastmmoe").create_from_arg_string(arg_string, {"batch_size": 1, "device": None})
    lm.task_dict = {TASK: {SPLIT: docs}}
    return lm


def _instance(kind, args, i):
    from lmms_eval.api.instance import Instance

    return Instance(kind, args, idx=0, metadata={"task": TASK, "doc_id": i, "repeats": 1})


def test_lmms_eval_generate_until(engine, docs):
    lm = _lmms(engine, docs, max_new_tokens=MAX_NEW)
    expected = [answer(engine, d["question"], d["image"], MAX_NEW) for d in docs]
    requests = [_instance("generate_until", (d["question"], {"until": ["\n\n\n"], "temperature": 0},
                                             doc_to_visual, i, TASK, SPLIT), i) for i, d in enumerate(docs)]
    assert lm.generate_until(requests) == expected
    # The task's max_new_tokens and stop strings apply.
    assert lm.generate_until([_instance("generate_until", (docs[1]["question"], {"max_new_tokens": 2},
                                                           doc_to_visual, 1, TASK, SPLIT), 1)]) == \
        [answer(engine, docs[1]["question"], docs[1]["image"], 2)]
    stop = expected[0][1:3]
    if stop:
        cut = lm.generate_until([_instance("generate_until", (docs[0]["question"], {"until": [stop]},
                                                              doc_to_visual, 0, TASK, SPLIT), 0)])
        assert cut == [expected[0][:expected[0].find(stop)]]


def _greedy_text(engine, doc, steps=4):
    """(prepared, text, ids): the doc's greedy answer, cut to its longest prefix (>= 2 tokens) that the
    byte-level tokenizer gives back unchanged (a lone UTF-8 continuation byte does not), or None."""
    images = [im.convert("RGB") for im in doc["image"]]
    prepared = engine.prepare(images, with_placeholders(doc["question"], len(images)))
    tokenizer = engine.front_end.tokenizer
    ids = engine.generate(inputs_embeds=prepared.inputs_embeds, vision_positions=prepared.vision_positions,
                          max_new_tokens=steps)[0].tolist()
    for n in range(len(ids), 1, -1):
        text = tokenizer.decode(ids[:n])
        if tokenizer(text, add_special_tokens=False)["input_ids"] == ids[:n]:
            return prepared, text, ids[:n]
    return None


def _prefill_only_score(engine, prepared, ids):
    """Each token scored by a fresh prefill of prompt + the tokens before it (no decode step)."""
    total, greedy = 0.0, True
    for k, token in enumerate(ids):
        embeds = prepared.inputs_embeds if k == 0 else \
            torch.cat([prepared.inputs_embeds, engine.embed(torch.tensor([ids[:k]], dtype=torch.long))], dim=1)
        logp = torch.log_softmax(engine.prefill(inputs_embeds=embeds, vision_positions=prepared.vision_positions)
                                 .logits[0], -1)
        total += logp[token].item()
        greedy = greedy and int(logp.argmax()) == token
    return total, greedy


def test_lmms_eval_loglikelihood_matches_prefill_only(engine, docs):
    lm = _lmms(engine, docs)
    found = [(i, g) for i, g in ((i, _greedy_text(engine, d)) for i, d in enumerate(docs)) if g is not None]
    assert found, "no doc's greedy answer round-trips through the tokenizer"
    i, (prepared, text, ids) = found[0]
    tokenizer = engine.front_end.tokenizer
    other = "B) tea"
    requests = [_instance("loglikelihood", (docs[i]["question"], target, doc_to_visual, i, TASK, SPLIT), i)
                for target in (text, lambda d: other)]  # a string, or lmms-eval's doc_to_target callable
    got = lm.loglikelihood(requests)
    for (logp, is_greedy), cont_ids in zip(got, (ids, tokenizer(other, add_special_tokens=False)["input_ids"])):
        expected, expected_greedy = _prefill_only_score(engine, prepared, cont_ids)
        assert logp == pytest.approx(expected, abs=1e-4)
        assert is_greedy == expected_greedy
    assert got[0][1] and not got[1][1]
    with pytest.raises(ValueError, match="continuation is empty"):
        continuation_logprob(engine, docs[i]["question"], "", docs[i]["image"])


def test_lmms_eval_bad_model_args(engine, docs, tmp_path):
    pytest.importorskip("lmms_eval", reason="lmms-eval not installed: pip install --no-deps lmms-eval pytz loguru")
    from lmms_eval.models import get_model

    cls = get_model("fastmmoe")
    with pytest.raises(FileNotFoundError, match="engine directory not found"):
        cls.create_from_arg_string(f"engine={tmp_path / 'missing'}")
    with pytest.raises(TypeError, match="unknown model_args"):
        cls.create_from_arg_string(f"engine={engine.path},temprature=0")
    with pytest.raises(ValueError, match="needs --model_args engine=DIR"):
        cls.create_from_arg_string("")
    with pytest.raises(NotImplementedError, match="multi-round"):
        _lmms(engine, docs).generate_until_multi_round([])
