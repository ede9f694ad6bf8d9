"""Sampling (runtime/sampling.py) and continuous batching (runtime/batching.py, serve/scheduler.py)
without HTTP: samples join and leave a running decode batch, and each one's greedy tokens equal
its tokens alone (engine.generate), whatever else is in flight."""
import pytest
import torch

from fastmmoe_compile.runtime.inputs import EngineInputError
from fastmmoe_compile.runtime.sampling import SamplingParams, TextStream, make_generator, sample

from .conftest import write_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")
pytest.importorskip("prometheus_client", reason="the serve extra: pip install 'fastmmoe-compile[serve]'")


# --- sampling ----------------------------------------------------------------------------

def test_sampling_params_are_checked():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2), dict(top_k=1.5),
                dict(seed="7"), dict(stop=[""]), dict(temperature=float("nan"))):
        with pytest.raises(EngineInputError):
            SamplingParams(**bad)
    assert SamplingParams(stop="x").stop == ("x",)


def test_greedy_rows_are_argmax_and_filters_hold():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    greedy = SamplingParams()
    assert torch.equal(sample(logits, [greedy] * 3, [None] * 3), logits.argmax(-1))
    # top_k: only the k largest logits are ever drawn; top_p: only the nucleus (reference: sorted probs).
    top2 = set(torch.topk(logits[0], 2).indices.tolist())
    probs, order = logits[1].softmax(-1).sort(descending=True)
    nucleus = set(order[:int((probs.cumsum(-1) < 0.5).sum()) + 1].tolist())
    pk, pp = SamplingParams(temperature=1.0, top_k=2, seed=1), SamplingParams(temperature=1.0, top_p=0.5, seed=2)
    gk, gp = make_generator(pk), make_generator(pp)
    drawn_k, drawn_p = set(), set()
    for _ in range(200):
        t = sample(logits[:2], [pk, pp], [gk, gp])
        drawn_k.add(int(t[0]))
        drawn_p.add(int(t[1]))
    assert drawn_k == top2 and drawn_p <= nucleus and len(drawn_p) > 1
    # the same seed draws the same tokens; top_k 1 is greedy at any temperature
    a = [sample(logits, [SamplingParams(temperature=2.0, seed=5)] * 3,
                [make_generator(SamplingParams(temperature=2.0, seed=5)) for _ in range(3)]) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    one = SamplingParams(temperature=5.0, top_k=1, seed=3)
    assert torch.equal(sample(logits, [one] * 3, [make_generator(one) for _ in range(3)]), logits.argmax(-1))


class CharTokenizer:
    """token i -> chr(i): enough for TextStream."""

    def decode(self, tokens, skip_special_tokens=True):
        return "".join(map(chr, tokens))


def test_text_stream_cuts_at_stop_strings_and_holds_back_their_starts():
    s = TextStream(CharTokenizer(), ("cd", "xyz"))
    pieces = [s.add(ord(c)) for c in "abxcdef"]
    assert "".join(pieces) == "abx" and s.stopped and s.text == "abx" and s.finish() == ""
    assert pieces[:4] == ["", "", "a", "b"]  # len("xyz") - 1 characters wait: they could start a stop string
    s = TextStream(CharTokenizer(), ("zz",))
    assert "".join(s.add(ord(c)) for c in "hello z") + s.finish() == "hello z" and not s.stopped


# --- continuous batching -------------------------------------------------------------------

@pytest.fixture(scope="module")
def requests_(serve_engine, tmp_path_factory):
    from fastmmoe_compile.serve.protocol import Job

    images = list(write_images(tmp_path_factory.mktemp("sched"), {"a": (60, 90), "b": (120, 50), "c": (40, 40)}).values())
    from PIL import Image

    pil = [Image.open(p).convert("RGB") for p in images]
    specs = [([pil[0]], "<image>What is this?", 7), ([], "Say something long about nothing.", 9),
             ([pil[1], pil[2]], "<image> and <image>: compare.", 6), ([pil[2]], "<image>Hi", 8),
             ([], "Short.", 5)]
    return [(Job("chat", max_tokens=n, sampling=SamplingParams(), prompt=p, chat=True, images=imgs), imgs, p, n)
            for imgs, p, n in specs]


def alone(engine, images, prompt, n):
    """The request's greedy tokens alone: engine.generate on its prepared inputs."""
    prepared = engine.prepare(images or None, prompt)
    eos = engine.front_end.tokenizer.eos_token_id
    return engine.generate(**prepared.backbone_inputs(), max_new_tokens=n, eos_token_id=eos)[0].tolist()


def test_join_and_leave_keep_each_sample_equal_to_it_alone(serve_engine, requests_):
    from fastmmoe_compile.serve.engine_io import EngineIO
    from fastmmoe_compile.serve.metrics import Metrics
    from fastmmoe_compile.serve.scheduler import Handle, Scheduler

    scheduler = Scheduler(EngineIO(serve_engine, "m", 4096), Metrics(), max_batch=3, max_queue=8)
    got, done = {}, {}

    def handle(i):
        def on_event(event):
            if event[0] == "token":
                got.setdefault(i, []).append(event[2])
            else:
                done[i] = event[1]
        return Handle(requests_[i][0], on_event=on_event)

    handles = [handle(i) for i in range(len(requests_))]
    with torch.inference_mode():
        scheduler._admit([handles[0]])  # A alone for two steps
        scheduler._step()
        scheduler._step()
        scheduler._admit([handles[1], handles[2]])  # B, C join a running batch (different lengths and layouts)
        scheduler._step()
        handles[1].cancel()  # B leaves mid-way
        for _ in range(3):
            scheduler._step()
        pending = [handles[3], handles[4]]  # D, E join as slots free up
        while scheduler.rows or pending:
            if pending and len(scheduler.rows) < scheduler.max_batch:
                scheduler._admit([pending.pop(0)])
            if scheduler.rows:
                scheduler._step()
    assert done[1] == "cancelled" and scheduler.state is None
    for i in (0, 2, 3, 4):
        job, images, prompt, n = requests_[i]
        assert got[i] == alone(serve_engine, images, prompt, n), i
        assert done[i] in ("stop", "length")
    expected_b = alone(serve_engine, *requests_[1][1:])
    assert got[1] == expected_b[:len(got[1])]  # its tokens up to the cancel were its own


# --- the serve command's own errors (no server started) ---------------------------------------

def test_serve_command_bad_input_is_one_line_and_exit_2(capsys, monkeypatch, tmp_path):
    import fastmmoe_compile.serve as serve
    from fastmmoe_compile.cli import main

    cases = [(["--max-batch", "0"], "--max-batch must be >= 1"), (["--port", "70000"], "--port must be in"),
             (["--allowed-local-media-path", str(tmp_path / "nope")], "is not a directory"),
             (["--max-tokens", "5000"], "must be below --max-model-len")]
    for flags, message in cases:
        assert main(["serve", str(tmp_path), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastmmoe-compile: error: ") and message in err and err.count("\n") == 1, err
    assert main(["serve", str(tmp_path / "missing-engine")]) == 2
    assert "missing-engine" in capsys.readouterr().err
    monkeypatch.setattr(serve, "missing_dependencies", lambda: ["uvicorn"])
    assert main(["serve", str(tmp_path)]) == 2
    assert "serve needs uvicorn: pip install 'fastmmoe-compile[serve]'" in capsys.readouterr().err


def test_serve_on_a_busy_port_is_one_line_and_exit_2(tmp_path):
    # The port is bound before the engine loads and before anything is announced: a busy one is one
    # line and exit 2 at once (the engine here is a manifest only: the load is never reached).
    import json
    import os
    import socket
    import subprocess
    import sys
    import time

    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "manifest.json").write_text(json.dumps({"format": "fastmmoe-engine", "format_version": 4, "files": {}}))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "fastmmoe_compile.cli", "serve", str(engine), "--port", str(port)],
                              capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
        elapsed = time.monotonic() - t0
    assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.splitlines() == [f"fastmmoe-compile: error: cannot listen on 127.0.0.1:{port}: the address is "
                                        "already in use (another server on that port? pick another --port)"]
    assert elapsed < 60  # the interpreter's start only (seconds); the engine load would come after


def test_python_api_sampling_and_stop_strings(serve_engine):
    greedy = serve_engine.generate(prompts="Tell me more.", max_new_tokens=12)[0]
    assert serve_engine.generate(prompts="Tell me more.", max_new_tokens=12, temperature=0.9, top_k=1, seed=4)[0] \
        == greedy
    stop = greedy[5:7]
    assert serve_engine.generate(prompts="Tell me more.", max_new_tokens=12, stop=[stop])[0] == \
        greedy[:greedy.find(stop)]
    pieces = list(serve_engine.generate(prompts="Tell me more.", max_new_tokens=12, stop=stop, stream=True))
    assert "".join(p[0] or "" for p in pieces) == greedy[:greedy.find(stop)]
    sampled = [serve_engine.generate(prompts="Tell me more.", max_new_tokens=12, temperature=1.0, seed=9)[0]
               for _ in range(2)]
    assert sampled[0] == sampled[1]
    with pytest.raises(EngineInputError, match="stop strings need the engine's tokenizer"):
        serve_engine.generate(torch.tensor([1, 2, 3]), stop=["x"])


class BytesTokenizer:
    """token i -> byte i, decoded as UTF-8 with U+FFFD for incomplete characters (as byte-level BPE)."""

    def decode(self, tokens, skip_special_tokens=True):
        return bytes(tokens).decode("utf-8", errors="replace")


def test_text_stream_waits_for_multi_byte_characters():
    data = "añb€c".encode()
    s = TextStream(BytesTokenizer(), ("€",))
    pieces = [s.add(b) for b in data]
    assert "".join(pieces) == "añb" and s.stopped  # "€"'s first byte alone ("\ufffd") is no stop and not shown
    s = TextStream(BytesTokenizer())
    assert "".join(s.add(b) for b in data) + s.finish() == "añb€c"


# --- penalties, logprobs and the prompt-length bounds (issue 22) ---------------------------------

def test_penalties_follow_openais_formula_and_greedy_without_them_is_argmax():
    from fastmmoe_compile.runtime.sampling import logprobs, penalize

    logits = torch.tensor([3.0, 2.9, 2.5, 0.0, -1.0])
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    # token 0 generated twice, token 2 once: logits[j] - c[j] * 0.25 - (c[j] > 0) * 0.5
    assert torch.allclose(penalize(logits, p, [0, 2, 0]), torch.tensor([3.0 - 0.5 - 0.5, 2.9, 2.5 - 0.25 - 0.5, 0.0, -1.0]))
    assert int(sample(logits[None], [p], [None], [[0, 2, 0]])[0]) == 1  # greedy on the penalised logits
    assert int(sample(logits[None], [p], [None], [[]])[0]) == 0 and int(sample(logits[None], [p], [None])[0]) == 0
    assert int(sample(logits[None], [SamplingParams(presence_penalty=-2.0)], [None], [[4]])[0]) == 0  # 1.0 < 3.0
    for bad in (dict(presence_penalty=2.5), dict(frequency_penalty=-2.1), dict(presence_penalty=float("nan"))):
        with pytest.raises(EngineInputError, match="in \\[-2, 2\\]"):
            SamplingParams(**bad)
    value, top = logprobs(logits, 1, 2)
    expected = torch.log_softmax(logits, -1)
    assert value == pytest.approx(float(expected[1])) and [t for t, _ in top] == [0, 1]
    assert [v for _, v in top] == pytest.approx(expected[:2].tolist()) and logprobs(logits, 1, 0)[1] == []


def test_a_prompt_over_the_limit_is_refused_before_it_is_embedded(serve_engine, monkeypatch):
    from fastmmoe_compile.serve.engine_io import EngineIO, chars_per_token
    from fastmmoe_compile.serve.errors import APIError
    from fastmmoe_compile.serve.protocol import Job, Limits, check_length_bound

    io = EngineIO(serve_engine, "tiny", max_model_len=64)
    tokenizer = serve_engine.front_end.tokenizer
    # the cheap bound is a true bound: no text tokenizes to fewer tokens than it claims
    per_token = chars_per_token(tokenizer)
    assert per_token == 3 * max(len(t) for t in tokenizer.get_vocab())
    for text in ("x" * 5000, "hello world " * 300, "<|im_start|>" * 200, "é" * 900, "日本語" * 400):
        assert len(tokenizer(text)["input_ids"]) >= len(text) / per_token
    limits = Limits(max_model_len=64, chars_per_token=per_token)
    check_length_bound(per_token * 60, 0, 4, limits)  # may fit: left to the tokenizer
    with pytest.raises(APIError, match="at least 61 tokens") as info:
        check_length_bound(per_token * 60, 1, 4, limits)
    assert info.value.code == "context_length_exceeded"
    # under the cheap bound but over once tokenized: refused before anything is embedded
    monkeypatch.setattr(serve_engine, "embed", lambda *a: pytest.fail("embedded a prompt over the limit"))
    job = Job("chat", max_tokens=4, sampling=SamplingParams(), prompt="word " * 60, chat=True)
    with pytest.raises(APIError, match="the prompt is \\d+ tokens and max_tokens 4") as info:
        io.sample(job)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(APIError, match="the prompt is 70 tokens"):
        io.sample(Job("completion", max_tokens=4, sampling=SamplingParams(), prompt_ids=list(range(70))))
