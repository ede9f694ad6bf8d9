"""OpenAI request bodies -> what the scheduler runs (a Job), checked field by field.

Each malformed field is one APIError 400 naming it. Chat messages become one prompt with the
front end's PLACEHOLDER where each image part stands:
- a conversation of one user message is the prompt engine.generate(prompts=, images=) takes, through
  the front end's own chat rule (so a greedy answer equals engine.generate's);
- any other conversation (system, earlier turns) goes through the tokenizer's chat template, and
  the text it writes for each image is handed back to the front end as PLACEHOLDER (raw prompt).
"""
from __future__ import annotations

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
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "frequency_penalty",
           "presence_penalty", "logit_bias", "stream_options", "n", "echo", "best_of", "suffix"}


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


@dataclass(frozen=True)
class Limits:
    max_images: int = 8
    default_max_tokens: int = 256
    max_tokens: int = 4096
    media: MediaPolicy = MediaPolicy()


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
    for ignored in ("frequency_penalty", "presence_penalty"):
        if body.get(ignored) not in (None, 0, 0.0):
            raise bad(f"{ignored} is not supported (only 0)")
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
    try:
        sampling = SamplingParams(temperature=_number(body, "temperature", 1.0), top_p=_number(body, "top_p", 1.0),
                                  top_k=_top_k(body), seed=seed, stop=tuple(stop or ()))
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
                   "stream"}


def parse_completion(body: dict, served_name: str, limits: Limits) -> Job:
    """POST /v1/completions: prompt is a string (raw text, no chat template) or a list of token ids."""
    job = Job("completion", **_common(body, served_name, limits, SAMPLING_FIELDS | {"prompt"}))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt is empty")
        if PLACEHOLDER in prompt:
            raise bad(f"completions take text only: the prompt may not contain {PLACEHOLDER} (send images to "
                      "/v1/chat/completions as image_url parts)")
        job.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        job.prompt_ids = list(prompt)
    else:
        raise bad("prompt must be a non-empty string or a list of token ids (one prompt per request)")
    return job


def parse_chat(body: dict, served_name: str, limits: Limits, conversation) -> Job:
    """POST /v1/chat/completions. conversation(messages) -> (prompt, chat): the engine's rule for
    turning [(role, [("text", str) | ("image", None)])] into a prompt (server.ChatRules)."""
    job = Job("chat", **_common(body, served_name, limits, SAMPLING_FIELDS | {"messages", "stream_options"}))
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
    job.prompt, job.chat = conversation(turns)
    job.images = [load_image_url(u, limits.media) for u in urls]
    return job
