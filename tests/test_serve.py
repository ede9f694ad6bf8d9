"""`fastmmoe-compile serve` as a real server process on a free loopback port, driven by the real
`openai` client: answers equal engine.generate (greedy), streaming equals non-streaming, usage is
right, 24 concurrent requests each equal the same request alone, bad inputs are 4xx and the server
keeps answering, a full queue is 429, a disconnected stream frees its slot, sampling is seeded.

Two servers for the whole module: the tiny InternVL FastMMoE engine (conftest serve_engine_dir)
and a tiny text-only engine (no tokenizer: token-id prompts) with one batch slot and one queue
slot, for the 429 / disconnect / API-key tests. Each is stopped by the test, with timeouts."""
import base64
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from .conftest import write_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")
openai = pytest.importorskip("openai", reason="the test extra: pip install 'fastmmoe-compile[test]'")
pytest.importorskip("uvicorn", reason="the serve extra: pip install 'fastmmoe-compile[serve]'")

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 300  # a loaded 2-core CI box loads an engine slowly; never longer than this
MODEL = "tiny"
MAX_BODY = 24_000_000  # the VLM server's --max-body-bytes: room for a 20 MiB prompt
SIZES = {"s0": (40, 40), "s1": (60, 90), "s2": (120, 50), "s3": (90, 160), "s4": (150, 120), "s5": (30, 70)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, engine_dir, flags, log_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        # one torch thread: the server shares the cores with the test process computing the references
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "fastmmoe_compile.cli", "serve", str(engine_dir),
                                      "--port", str(self.port), *flags], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env)

    def wait_ready(self):
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited ({self.proc.returncode}):\n{Path(self.log_path).read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise AssertionError(f"the server did not start in {START_TIMEOUT_S} s:\n{Path(self.log_path).read_text()}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()

    def client(self, api_key="unused"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120)

    def post(self, path, body, headers=None):
        """(status, parsed JSON body) of a raw POST (bytes or a JSON-able object)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST",
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            return r.read().decode()


@pytest.fixture(scope="module")
def text_engine_dir(tmp_path_factory):
    from fastmmoe_compile.cli import main

    out = tmp_path_factory.mktemp("serve-text") / "tiny-qwen3-moe"
    assert main(["tiny-qwen3-moe", "--out", str(out), "--backend", "export", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed")
    return allowed, write_images(allowed, SIZES)


@pytest.fixture(scope="module")
def servers(serve_engine_dir, text_engine_dir, media, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    vlm = ServerProcess(serve_engine_dir, ["--served-model-name", MODEL, "--max-batch", "4", "--max-queue", "32",
                                           "--max-model-len", "512", "--max-images", "4", "--max-image-pixels",
                                           "200000", "--max-body-bytes", str(MAX_BODY), "--allowed-local-media-path",
                                           str(media[0])], logs / "vlm.log")
    text = ServerProcess(text_engine_dir, ["--served-model-name", MODEL, "--max-batch", "1", "--max-queue", "1",
                                           "--api-key", "sekret"], logs / "text.log")
    try:
        yield vlm.wait_ready(), text.wait_ready()
    finally:
        vlm.stop()
        text.stop()


@pytest.fixture(scope="module")
def vlm(servers):
    return servers[0]


@pytest.fixture(scope="module")
def text_server(servers):
    return servers[1]


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def parts(*items):
    """Chat content: Path -> an image_url part (data URL), str -> a text part."""
    return [{"type": "image_url", "image_url": {"url": data_url(x)}} if isinstance(x, Path) else
            {"type": "text", "text": x} for x in items]


def engine_prompt(*items) -> str:
    return "".join("<image>" if isinstance(x, Path) else x for x in items)


def reference(engine, items, max_tokens, **sampling):
    """engine.generate's answer to the same request, alone: (text, new token count, prompt tokens)."""
    images = [x for x in items if isinstance(x, Path)]
    prepared = engine.prepare(images or None, engine_prompt(*items))
    tokenizer = engine.front_end.tokenizer
    tokens = engine.generate(**prepared.backbone_inputs(), max_new_tokens=max_tokens,
                             eos_token_id=tokenizer.eos_token_id, **sampling)[0]
    return tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), int(prepared.input_ids.shape[-1])


def chat(client, items, max_tokens=8, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts(*items)}],
                                          max_tokens=max_tokens, temperature=kwargs.pop("temperature", 0), **kwargs)


# --- the VLM server -------------------------------------------------------------------------

def test_models_health_and_metrics(vlm):
    assert [m.id for m in vlm.client().models.list().data] == [MODEL]
    with urllib.request.urlopen(vlm.url + "/health", timeout=10) as r:
        assert json.loads(r.read()) == {"status": "ok"}
    text = vlm.metrics()
    for name in ("fastmmoe_requests_total", "fastmmoe_time_to_first_token_seconds", "fastmmoe_queue_depth",
                 "fastmmoe_time_per_output_token_seconds", "fastmmoe_decode_batch_size", "fastmmoe_vision_tokens_total"):
        assert name in text


def test_greedy_chat_equals_engine_generate(vlm, serve_engine, media):
    images = media[1]
    client = vlm.client()
    for items in [(images["s1"], "Describe."), ("hello there, how are you?",),
                  ("Look: ", images["s2"], " and ", images["s0"], " - what differs?")]:
        answer = chat(client, items, max_tokens=6)
        text, count, prompt_tokens = reference(serve_engine, items, 6)
        assert answer.choices[0].message.content == text
        assert answer.usage.completion_tokens == count and answer.usage.prompt_tokens == prompt_tokens
        assert answer.usage.total_tokens == count + prompt_tokens
        assert answer.choices[0].finish_reason == ("length" if count == 6 else "stop")


def test_streaming_equals_non_streaming(vlm, media):
    client = vlm.client()
    for items in [(media[1]["s3"], "What is it?"), ("plain text",)]:
        whole = chat(client, items, max_tokens=8)
        chunks = list(chat(client, items, max_tokens=8, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert text == whole.choices[0].message.content and reasons == [whole.choices[0].finish_reason]
        assert chunks[-1].usage.model_dump() == whole.usage.model_dump() and not chunks[-1].choices
    done = vlm.client().completions.create(model=MODEL, prompt="raw text prompt", max_tokens=6, temperature=0)
    streamed = list(vlm.client().completions.create(model=MODEL, prompt="raw text prompt", max_tokens=6,
                                                    temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text


def test_completions_take_raw_text(vlm, serve_engine):
    answer = vlm.client().completions.create(model=MODEL, prompt="once upon a time", max_tokens=7, temperature=0)
    expected = serve_engine.generate(prompts="once upon a time", chat=False, max_new_tokens=7)[0]
    assert answer.choices[0].text == expected
    assert answer.usage.completion_tokens == len(answer.choices[0].model_extra["token_ids"])


def test_conversation_with_system_and_earlier_turns(vlm, media):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": parts(media[1]["s0"], "What is this?")},
                {"role": "assistant", "content": "A picture."},
                {"role": "user", "content": parts("And this one?", media[1]["s5"])}]
    answer = vlm.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.prompt_tokens > 40


def test_24_concurrent_requests_each_equal_it_alone(vlm, serve_engine, media):
    images = list(media[1].values())
    requests = []
    for i in range(24):
        if i % 6 == 5:
            items = (f"text only request {i}",)
        elif i % 6 == 4:
            items = (images[i % 6], images[(i + 1) % 6], f"two images {i}")
        else:
            items = (images[i % 6], f"question {i}?")
        requests.append((items, 2 + i % 4))
    client = vlm.client()

    def send(request):
        items, n = request
        answer = chat(client, items, max_tokens=n)
        return answer.choices[0].message.content, answer.usage.completion_tokens

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(send, requests))  # any 4xx/5xx raises here
    for (items, n), (text, count) in zip(requests, answers):
        expected, expected_count, _ = reference(serve_engine, items, n)
        assert (text, count) == (expected, expected_count), items
    metrics = vlm.metrics()
    assert 'status="500"' not in metrics


def test_sampling_is_seeded_and_top_k_1_is_greedy(vlm, serve_engine, media):
    client = vlm.client()
    items = (media[1]["s1"], "Tell me a story.")

    def tokens(**kw):
        return chat(client, items, max_tokens=8, **kw).choices[0].message.content

    a = tokens(temperature=1.0, seed=11, top_p=0.95)
    assert a == tokens(temperature=1.0, seed=11, top_p=0.95)
    assert len({a, tokens(temperature=1.0, seed=12), tokens(temperature=1.0, seed=13)}) > 1
    assert tokens(temperature=1.0, extra_body={"top_k": 1}) == tokens(temperature=0)
    # the Python API agrees with the server for the same seed
    assert a == reference(serve_engine, items, 8, temperature=1.0, seed=11, top_p=0.95)[0]


def test_stop_strings_cut(vlm):
    client = vlm.client()
    full = chat(client, ("count for me",), max_tokens=16).choices[0].message.content
    stop = full[4:6]
    cut = chat(client, ("count for me",), max_tokens=16, stop=[stop])
    assert cut.choices[0].message.content == full[:full.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = chat(client, ("count for me",), max_tokens=16, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[:full.find(stop)]


def png_header_only(width, height) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's shape) with almost no data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_bad_inputs_are_4xx_and_the_server_keeps_answering(vlm, media, tmp_path):
    good = {"model": MODEL, "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 2}

    def with_image(url, **extra):
        return {**good, **extra, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]}]}

    big = tmp_path / "big.png"
    write_images(tmp_path, {"big": (500, 500)})
    outside = write_images(tmp_path, {"outside": (20, 20)})["outside"]
    b64 = "data:image/png;base64,"
    cases = [
        (b"{not json", 400, "invalid_json"),
        ([1, 2], 400, None),
        ({**good, "messages": []}, 400, None),
        ({**good, "model": "other"}, 400, "model_not_found"),
        ({**good, "n": 2}, 400, None),
        ({**good, "temperature": -1}, 400, None),
        ({**good, "max_tokens": 0}, 400, None),
        ({**good, "frobnicate": 1}, 400, "unknown_field"),
        (with_image(b64 + base64.b64encode(b"not an image at all").decode()), 400, "invalid_image"),
        (with_image(b64 + "%%%not base64"), 400, "invalid_image"),
        (with_image(data_url(big)), 413, "image_too_large"),
        (with_image(b64 + base64.b64encode(png_header_only(60000, 60000)).decode()), 413, "image_too_large"),
        ({**good, "messages": [{"role": "user", "content": parts(*[media[1]["s0"]] * 5, "many")}]}, 400,
         "too_many_images"),
        ({**good, "messages": [{"role": "user", "content": "word " * 150}]}, 400, "context_length_exceeded"),
        (with_image("file://" + str(outside)), 403, "local_media_forbidden"),
        (with_image("file://" + str(media[0] / ".." / outside.parent.name / outside.name)), 403,
         "local_media_forbidden"),
        (with_image("http://127.0.0.1:9/x.png"), 403, "image_fetch_forbidden"),
        ({**good, "messages": [{"role": "assistant", "content": parts(media[1]["s0"])},
                               {"role": "user", "content": "x"}]}, 400, None),
        (b"{" + b" " * MAX_BODY + b"}", 413, "body_too_large"),
    ]
    for body, status, code in cases:
        got, answer = vlm.post("/v1/chat/completions", body)
        assert got == status, (body if isinstance(body, (dict, list)) else body[:40], answer)
        assert set(answer["error"]) == {"message", "type", "code"} and answer["error"]["message"]
        assert code is None or answer["error"]["code"] == code, answer
    status, answer = vlm.post("/v1/completions", {"model": MODEL, "prompt": "x <image> y"})
    assert status == 400
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(vlm.url + "/v1/nothing", timeout=10)
    assert e.value.code == 404
    # an allowed local file answers as its data URL does; and the server still answers
    inside = media[1]["s2"]
    by_file = vlm.post("/v1/chat/completions", with_image("file://" + str(inside), max_tokens=5, temperature=0))
    by_data = vlm.post("/v1/chat/completions", with_image(data_url(inside), max_tokens=5, temperature=0))
    assert by_file[0] == by_data[0] == 200
    assert by_file[1]["choices"][0]["message"] == by_data[1]["choices"][0]["message"]
    assert 'status="500"' not in vlm.metrics()


def test_token_reduction_shows_in_metrics(vlm):
    lines = {line.split(" ")[0]: float(line.split(" ")[1]) for line in vlm.metrics().splitlines()
             if line.startswith("fastmmoe_vision_tokens_total")}
    before, after = lines['fastmmoe_vision_tokens_total{stage="before"}'], lines[
        'fastmmoe_vision_tokens_total{stage="after"}']
    assert 0 < after < before  # the engine merges vision tokens at layer 2 (keep ratio 0.5)


# --- the text-only server: token ids, API key, 429, disconnects ---------------------------------

def test_text_only_engine_takes_token_ids(text_server, text_engine_dir):
    from fastmmoe_compile import load_engine

    engine = load_engine(text_engine_dir)
    client = text_server.client("sekret")
    ids = [5, 17, 99, 3, 42, 7]
    answer = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    expected = engine.generate(torch.tensor(ids), max_new_tokens=6)[0].tolist()
    assert answer.choices[0].model_extra["token_ids"] == expected and answer.choices[0].text == ""
    assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == 6
    for bad in (dict(prompt="text needs a tokenizer"), dict(prompt=ids, stop=["x"])):
        with pytest.raises(openai.BadRequestError, match="no tokenizer"):
            client.completions.create(model=MODEL, max_tokens=2, **bad)
    with pytest.raises(openai.BadRequestError, match="no tokenizer"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="input_ids"):
        client.completions.create(model=MODEL, prompt=[1, 10 ** 6], max_tokens=2)


def test_api_key_is_required(text_server):
    with pytest.raises(openai.AuthenticationError):
        text_server.client("wrong").models.list()
    assert [m.id for m in text_server.client("sekret").models.list().data] == [MODEL]


def wait_for(condition, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def gauge(server, name) -> float:
    return next(float(line.split(" ")[1]) for line in server.metrics().splitlines() if line.startswith(name + " "))


def test_queue_full_is_429_and_a_disconnected_stream_frees_its_slot(text_server):
    client = text_server.client("sekret")
    long = dict(model=MODEL, prompt=[1, 2, 3, 4], max_tokens=3000, temperature=0, stream=True)
    first = client.completions.create(**long)  # holds the one batch slot
    next(iter(first))
    second = {}
    thread = threading.Thread(target=lambda: second.setdefault("stream", client.completions.create(**long)))
    thread.start()  # waits in the one queue slot
    wait_for(lambda: gauge(text_server, "fastmmoe_queue_depth") == 1, "the second request to queue")
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=2)
    assert e.value.response.headers["retry-after"] == "1"
    first.close()  # the client goes away: its slot frees and the queued request runs
    thread.join(120)
    assert not thread.is_alive()
    next(iter(second["stream"]))
    second["stream"].close()
    wait_for(lambda: gauge(text_server, "fastmmoe_decode_batch_size") == 0, "the batch to empty")
    answer = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=3, temperature=0)
    assert answer.usage.completion_tokens == 3
    assert 'status="499"} 2.0' in text_server.metrics()


# --- one request's work is bounded before it is done (issue 22) ---------------------------------

def rss_mb(pid) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def timed(call):
    t0 = time.monotonic()
    result = call()
    return result, time.monotonic() - t0


# The server's RSS may grow by this much while it refuses a 20 MiB prompt: the body is held about
# three times (the bytes read, the parsed JSON, the request's text) and nothing is tokenized.
HUGE_PROMPT_RSS_MB = 150


def test_a_huge_prompt_is_refused_at_once_and_delays_no_other(vlm):
    client = vlm.client()

    def small():
        return chat(client, ("hi there, a small question",), max_tokens=4)

    alone = min(timed(small)[1] for _ in range(3))  # its normal time
    huge = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 20 * 2 ** 20}],
                       "max_tokens": 4}).encode()
    before, peak, stop = rss_mb(vlm.proc.pid), [0.0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb(vlm.proc.pid))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(2) as pool:
            big = pool.submit(timed, lambda: vlm.post("/v1/chat/completions", huge))
            time.sleep(0.05)  # the big one first, as in the report
            beside = pool.submit(timed, small)
            (status, answer), big_s = big.result()
            reply, small_s = beside.result()
    finally:
        stop.set()
        watcher.join()
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded", answer
    assert "at least" in answer["error"]["message"]  # refused from its length, never tokenized
    assert big_s < 1.0, big_s
    assert reply.choices[0].message.content is not None and reply.usage.completion_tokens >= 1
    assert small_s < max(3 * alone, alone + 1.0), (small_s, alone)
    assert peak[0] - before < HUGE_PROMPT_RSS_MB, (before, peak[0])
    completion = vlm.post("/v1/completions", {"model": MODEL, "prompt": "y" * 2 ** 20, "max_tokens": 2})
    assert completion[0] == 400 and completion[1]["error"]["code"] == "context_length_exceeded"


# --- OpenAI parity: logprobs, penalties, value ranges (issue 22) ---------------------------------

def last_logits(engine, prompt, chat_rule=True):
    prefill = engine.prefill(prompts=prompt, chat=chat_rule)
    return prefill.logits.reshape(-1, prefill.logits.shape[-1])[-1].float()


def test_chat_logprobs_streamed_and_not(vlm, serve_engine):
    client = vlm.client()
    plain = chat(client, ("Describe it.",), max_tokens=5)
    assert plain.choices[0].logprobs is None  # only when asked
    answer = chat(client, ("Describe it.",), max_tokens=5, logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert answer.choices[0].message.content == plain.choices[0].message.content
    assert len(content) == answer.usage.completion_tokens
    for entry in content:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.token == entry.top_logprobs[0].token and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.bytes == list(entry.token.encode("utf-8"))
    # the first token's numbers are the model's own: log_softmax of the prompt's last logits
    expected = torch.log_softmax(last_logits(serve_engine, "Describe it."), -1).topk(3).values.tolist()
    assert [t.logprob for t in content[0].top_logprobs] == pytest.approx(expected, abs=1e-4)
    chunks = list(chat(client, ("Describe it.",), max_tokens=5, logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.top_logprobs[0].token) for e in streamed] == [(e.token, e.top_logprobs[0].token) for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)
    zero = chat(client, ("Describe it.",), max_tokens=2, logprobs=True)
    assert [e.top_logprobs for e in zero.choices[0].logprobs.content] == [[], []]


def test_completion_logprobs_streamed_and_not(vlm, serve_engine):
    client = vlm.client()
    done = client.completions.create(model=MODEL, prompt="once upon a time", max_tokens=6, temperature=0, logprobs=2)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert token in top and 1 <= len(top) <= 3 and value == pytest.approx(max(top.values()))
    expected = torch.log_softmax(last_logits(serve_engine, "once upon a time", False), -1).max().item()
    assert lp.token_logprobs[0] == pytest.approx(expected, abs=1e-4)
    chunks = list(client.completions.create(model=MODEL, prompt="once upon a time", max_tokens=6, temperature=0,
                                            logprobs=2, stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset
    assert [v for s in streamed for v in s.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-5)


def penalized_greedy(engine, prompt, n, presence=0.0, frequency=0.0):
    """The reference: greedy decoding with OpenAI's penalties written out (counts of the tokens
    generated so far), through engine.prefill / decode."""
    prepared = engine.prepare(None, prompt, chat=False)
    result = engine.prefill(**prepared.backbone_inputs())
    state = engine.start_decode([result], n)
    logits, tokens = result.logits.reshape(-1, result.logits.shape[-1])[-1].float(), []
    for _ in range(n):
        counts = torch.bincount(torch.tensor(tokens, dtype=torch.long), minlength=logits.shape[-1]).float()
        token = int((logits - counts * frequency - (counts > 0).float() * presence).argmax())
        tokens.append(token)
        logits = engine.decode(state, torch.tensor([[token]]))[0].float()
    return tokens


def test_presence_and_frequency_penalties_as_openai_defines_them(vlm, serve_engine):
    client = vlm.client()

    def ids(**kw):
        answer = client.completions.create(model=MODEL, prompt="la la la la", max_tokens=12, temperature=0, **kw)
        return answer.choices[0].model_extra["token_ids"]

    base = ids()
    assert len(set(base)) < len(base)  # the tiny model repeats itself: the penalties have work to do
    for kw in (dict(frequency_penalty=2.0), dict(presence_penalty=1.5), dict(presence_penalty=-1.0,
                                                                               frequency_penalty=0.5)):
        got = ids(**kw)
        assert got == penalized_greedy(serve_engine, "la la la la", 12, kw.get("presence_penalty", 0.0),
                                       kw.get("frequency_penalty", 0.0)), kw
    assert ids(frequency_penalty=2.0) != base
    # sampling with a penalty is seeded like any other
    a = chat(client, ("hello",), max_tokens=6, temperature=1.0, seed=3, presence_penalty=0.5)
    assert a.choices[0].message.content == chat(client, ("hello",), max_tokens=6, temperature=1.0, seed=3,
                                                presence_penalty=0.5).choices[0].message.content


@pytest.mark.parametrize("kw", [dict(temperature=5), dict(temperature=2.01), dict(presence_penalty=2.5),
                                dict(frequency_penalty=-3), dict(top_p=1.5), dict(logprobs=True, top_logprobs=21),
                                dict(top_logprobs=2), dict(max_tokens=0)])
def test_values_outside_openais_ranges_are_400(vlm, kw):
    with pytest.raises(openai.BadRequestError):
        vlm.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                             **{"max_tokens": 2, **kw})


def test_values_at_openais_bounds_are_accepted(vlm):
    answer = vlm.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=2, temperature=2, top_p=1, presence_penalty=-2,
                                                  frequency_penalty=2, logprobs=True, top_logprobs=20, seed=1)
    assert len(answer.choices[0].logprobs.content[0].top_logprobs) == 20
    with pytest.raises(openai.BadRequestError):
        vlm.client().completions.create(model=MODEL, prompt="hi", max_tokens=2, logprobs=6)
