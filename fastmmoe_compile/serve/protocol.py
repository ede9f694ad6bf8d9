"""OpenAI request bodies -> what the scheduler runs (a Job), checked field by field.

Each malformed field is one APIError 400 naming it. Chat messages become one prompt with the
front end's PLACEHOLDER where each image part stands:
- a conversation of one user message is the prompt engine.generate(prompts=, images=) takes, through
  the front end's own chat rule (so a greedy answer equals engine.generate's);
- any other conversation (system, earlier turns) goes through the tokenizer's chat template, and
  the text it writes for each image is handed back to the front end as PLACEHOLDER (raw prompt).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..runtime.frontends import PLACEHOLDER
from ..runtime.inputs import EngineInputError
from ..runtime.sampling import SamplingParams
from .errors import APIError
from .media import MediaPolicy, load_image_url

ROLES = ("system", "developer", "user", "assistant")
# OpenAI fields accepted besides the sampling ones: bookkeeping that does not change the answer
# (user, metadata, store, service_tier, parallel_tool_calls), and fields _common checks (only their
# no-op values pass). Any other field is a 400, never silently dropped.
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "logit_bias", "stream_options", "n",
           "echo", "best_of", "suffix"}
# OpenAI's value ranges (API reference): a value outside them is a 400, as OpenAI answers it.
TEMPERATURE_MAX = 2.0
PENALTY_RANGE = (-2.0, 2.0)
TOP_LOGPROBS_MAX = 20  # chat: top_logprobs
COMPLETION_LOGPROBS_MAX = 5  # completions: logprobs (the legacy API's bound)


@dataclass
class Job:
    """One generation request. prompt: text with PLACEHOLDER per image (chat: whether the front end
    applies its chat rule), or prompt_ids: token ids. max_tokens: the most new tokens."""

    kind: str  # "chat" | "completion"
    max_tokens: int
    sampling: SamplingParams
    stream: bool = False
    include_usage: bool = False
    prompt: str | None = None
    chat: bool = False
    prompt_ids: list[int] | None = None
    images: list = field(default_factory=list)
    logprobs: int | None = None  # None: no logprobs; n >= 0: each token's logprob and its n most likely alternatives


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. max_model_len: prompt + new tokens (None: unchecked here).
    chars_per_token: the most characters one token of the engine's tokenizer stands for
    (EngineIO.chars_per_token; None: no cheap bound), so that a prompt of C characters and I images
    is at least ceil(C / chars_per_token) + I tokens: over max_model_len, it is refused before it is
    tokenized, its images decoded or anything embedded."""

    max_images: int = 8
    default_max_tokens: int = 256
    max_tokens: int = 4096
    media: MediaPolicy = MediaPolicy()
    max_model_len: int | None = None
    chars_per_token: int | None = None


def check_length_bound(chars: int, images: int, max_tokens: int, limits: Limits) -> None:
    """APIError 400 context_length_exceeded, in microseconds, when a prompt of `chars` characters
    and `images` images cannot fit --max-model-len whatever its exact tokenization."""
    if limits.max_model_len is None or not limits.chars_per_token:
        return
    at_least = math.ceil(chars / limits.chars_per_token) + images
    if at_least + max_tokens > limits.max_model_len:
        raise APIError(400, f"the prompt is at least {at_least} tokens ({chars} characters, at most "
                            f"{limits.chars_per_token} per token{f', and {images} image(s)' if images else ''}) and "
                            f"max_tokens {max_tokens}: more than the {limits.max_model_len} this server allows "
                            "(--max-model-len)", code="context_length_exceeded")


def bad(message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, code=code)


def _number(body, name, default, kind=float):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise bad(f"{name} must be {'a number' if kind is float else 'an integer'}, got {value!r}")
    return value


def _common(body: dict, served_name: str, limits: Limits, known: set[str]) -> dict:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    unknown = sorted(set(body) - known - IGNORED)
    if unknown:
        raise bad(f"unknown field(s) {', '.join(unknown)}", "unknown_field")
    model = body.get("model")
    if model != served_name:
        raise APIError(400, f"model {model!r} is not served here; this server serves {served_name!r} (GET /v1/models)",
                       code="model_not_found")
    n = body.get("n", 1)
    if n != 1:
        raise bad(f"n must be 1 (one choice per request), got {n!r}")
    if body.get("logit_bias"):
        raise bad("logit_bias is not supported")
    if body.get("echo") or body.get("suffix") or body.get("best_of") not in (None, 1):
        raise bad("echo, suffix and best_of are not supported")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= limits.max_tokens:
        raise bad(f"max_tokens must be an integer in [1, {limits.max_tokens}], got {max_tokens!r}")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4 or
                             any(not isinstance(s, str) or not s for s in stop)):
        raise bad("stop must be a non-empty string or a list of up to 4 of them")
    seed = _number(body, "seed", None, int)
    temperature = _number(body, "temperature", 1.0)
    if not 0 <= temperature <= TEMPERATURE_MAX:
        raise bad(f"temperature must be in [0, {TEMPERATURE_MAX:g}], got {temperature!r}")
    penalties = {}
    for name in ("presence_penalty", "frequency_penalty"):
        penalties[name] = _number(body, name, 0.0)
        if not PENALTY_RANGE[0] <= penalties[name] <= PENALTY_RANGE[1]:
            raise bad(f"{name} must be in [{PENALTY_RANGE[0]:g}, {PENALTY_RANGE[1]:g}], got {penalties[name]!r}")
    try:
        sampling = SamplingParams(temperature=temperature, top_p=_number(body, "top_p", 1.0),
                                  top_k=_top_k(body), seed=seed, stop=tuple(stop or ()), **penalties)
    except EngineInputError as e:
        raise bad(str(e)) from e
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad(f"stream must be true or false, got {stream!r}")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise bad("stream_options may hold include_usage only")
    if options and not stream:
        raise bad("stream_options needs stream: true")
    return dict(max_tokens=max_tokens, sampling=sampling, stream=stream,
                include_usage=bool(options.get("include_usage", False)))


def _top_k(body) -> int:
    value = _number(body, "top_k", 0, int)
    return 0 if value == -1 else value  # vLLM's -1 (off) too


SAMPLING_FIELDS = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                   "stream", "presence_penalty", "frequency_penalty", "logprobs"}


def _chat_logprobs(body) -> int | None:
    """Chat: logprobs (true/false) and top_logprobs (0..20, needs logprobs true) -> Job.logprobs."""
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise bad(f"logprobs must be true or false, got {wanted!r}")
    top = _number(body, "top_logprobs", None, int)
    if top is not None and not 0 <= top <= TOP_LOGPROBS_MAX:
        raise bad(f"top_logprobs must be an integer in [0, {TOP_LOGPROBS_MAX}], got {top!r}")
    if top is not None and not wanted:
        raise bad("top_logprobs needs logprobs: true")
    return (top or 0) if wanted else None


def _completion_logprobs(body) -> int | None:
    """Completions: logprobs is the number of alternatives, 0..5 (None: no logprobs)."""
    n = _number(body, "logprobs", None, int)
    if n is not None and not 0 <= n <= COMPLETION_LOGPROBS_MAX:
        raise bad(f"logprobs must be an integer in [0, {COMPLETION_LOGPROBS_MAX}], got {n!r}")
    return n


def parse_completion(body: dict, served_name: str, limits: Limits) -> Job:
    """POST /v1/completions: prompt is a string (raw text, no chat template) or a list of token ids."""
    job = Job("completion", **_common(body, served_name, limits, SAMPLING_FIELDS | {"prompt"}))
    job.logprobs = _completion_logprobs(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt is empty")
        if PLACEHOLDER in prompt:
            raise bad(f"completions take text only: the prompt may not contain {PLACEHOLDER} (send images to "
                      "/v1/chat/completions as image_url parts)")
        check_length_bound(len(prompt), 0, job.max_tokens, limits)
        job.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        job.prompt_ids = list(prompt)
    else:
        raise bad("prompt must be a non-empty string or a list of token ids (one prompt per request)")
    return job


def parse_chat(body: dict, served_name: str, limits: Limits, conversation) -> Job:
    """POST /v1/chat/completions. conversation(messages) -> (prompt, chat): the engine's rule for
    turning [(role, [("text", str) | ("image", None)])] into a prompt (server.ChatRules)."""
    job = Job("chat", **_common(body, served_name, limits, SAMPLING_FIELDS | {"messages", "stream_options",
                                                                             "top_logprobs"}))
    job.logprobs = _chat_logprobs(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list")
    turns, urls = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"messages[{i}] must be an object with role one of {', '.join(ROLES)}")
        content = m.get("content")
        parts = []
        if isinstance(content, str):
            parts.append(("text", content))
        elif isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append(("text", part["text"]))
                elif kind == "image_url" and m["role"] == "user":
                    image = part.get("image_url")
                    urls.append(image.get("url") if isinstance(image, dict) else image)
                    parts.append(("image", None))
                else:
                    raise bad(f"messages[{i}].content[{j}] must be a text part or (in a user message) an "
                              "image_url part")
        else:
            raise bad(f"messages[{i}].content must be a string or a list of parts")
        if any(kind == "text" and PLACEHOLDER in text for kind, text in parts):
            raise bad(f"messages[{i}]: text may not contain {PLACEHOLDER}; send images as image_url parts")
        turns.append(("system" if m["role"] == "developer" else m["role"], parts))
    if turns[-1][0] != "user":
        raise bad("the last message must be the user's")
    if len(urls) > limits.max_images:
        raise bad(f"{len(urls)} images in one request; at most {limits.max_images} (--max-images)", "too_many_images")
    # Before the chat template, the image decoding and the tokenizer: a prompt that cannot fit is refused now.
    chars = sum(len(value) for _, parts in turns for kind, value in parts if kind == "text")
    check_length_bound(chars, len(urls), job.max_tokens, limits)
    job.prompt, job.chat = conversation(turns)
    job.images = [load_image_url(u, limits.media) for u in urls]
    return job
