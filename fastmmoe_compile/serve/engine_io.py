"""What the server needs from an engine: its name, its tokenizer and chat rule, and a Job's backbone inputs.

Engines without a tokenizer (text-only engines: compile_model saves a tokenizer for VLMs only)
cannot read text: their chat requests and string prompts are 400s that say so, and
/v1/completions takes their prompt as a list of token ids (OpenAI's token-array prompt); the
answer's text is then empty and its tokens are in the choice's `token_ids`.
"""
from __future__ import annotations

import json

import torch

from ..runtime import inputs
from ..runtime.frontends import PLACEHOLDER
from ..runtime.frontends.base import PromptError
from ..runtime.inputs import EngineInputError, PromptTooLongError
from .errors import APIError

# Unicode normalization may compose characters (NFC: a base and a combining mark, or Hangul's
# three jamo, become one), so a token may stand for up to 3x the characters of its own text.
NORMALIZATION_SLACK = 3
_LENGTH_KEEPING_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase"}


def chars_per_token(tokenizer) -> int | None:
    """The most characters of text one token can stand for, None where that is not known.
    Byte-level BPE (every supported family) writes each byte of a token as one character of its
    vocabulary entry, so a token stands for at most len(entry) bytes, hence characters; times
    NORMALIZATION_SLACK for a normalizer that composes characters. A tokenizer whose normalizer
    may drop characters (BERT's strips accents and controls), or a slow one, gives None: its
    prompts are only checked once tokenized."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        normalizer = json.loads(backend.to_str()).get("normalizer")
    except (ValueError, AttributeError):
        return None

    def keeps(n) -> bool:
        if n is None:
            return True
        if n.get("type") == "Sequence":
            return all(keeps(m) for m in n.get("normalizers", []))
        return n.get("type") in _LENGTH_KEEPING_NORMALIZERS

    if not keeps(normalizer):
        return None
    longest = max((len(entry) for entry in tokenizer.get_vocab()), default=0)
    return longest * NORMALIZATION_SLACK if longest else None

NO_TOKENIZER = ("this engine has no tokenizer (text-only engines carry none; VLM engines compiled from a "
                "checkpoint without tokenizer files neither): it cannot read text; send /v1/completions a "
                "prompt of token ids")


class EngineIO:
    """The engine seen from the server. max_model_len: prompt + new tokens allowed per request."""

    def __init__(self, engine, name: str, max_model_len: int):
        self.engine = engine
        self.name = name
        self.max_model_len = max_model_len
        front = engine.front_end
        self.tokenizer = getattr(front, "tokenizer", None) if front is not None else None
        if front is not None and getattr(front, "image_processor", None) is None:
            self.tokenizer = None  # prepare() refuses prompts without both
        self.vision = front is not None
        eos = getattr(self.tokenizer, "eos_token_id", None)
        self.eos = frozenset() if eos is None else frozenset([eos] if isinstance(eos, int) else eos)
        self.chars_per_token = chars_per_token(self.tokenizer) if self.tokenizer is not None else None

    def token_text(self, token: int) -> str:
        """One token as logprobs show it: its text alone (a piece of a multi-byte character decodes
        to U+FFFD, as OpenAI's and vLLM's do), or "token_id:N" for an engine without a tokenizer."""
        if self.tokenizer is None:
            return f"token_id:{token}"
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def conversation(self, turns: list) -> tuple[str, bool]:
        """[(role, [("text", str) | ("image", None)])] -> (prompt with PLACEHOLDER per image, chat)."""
        if self.tokenizer is None:
            raise APIError(400, NO_TOKENIZER, code="no_tokenizer")
        def text(parts):
            return "".join(PLACEHOLDER if kind == "image" else value for kind, value in parts)

        if not self.vision and any(kind == "image" for _, parts in turns for kind, _ in parts):
            raise APIError(400, "this is a text-only engine: image_url parts are not accepted", code="no_vision")
        if len(turns) == 1:  # one user message: engine.generate's own prompt form
            return text(turns[0][1]), True
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise APIError(400, "this engine's tokenizer has no chat template: send one user message",
                           code="no_chat_template")
        messages = [{"role": role, "content": [{"type": "image"} if kind == "image" else {"type": "text", "text": v}
                                               for kind, v in parts]} for role, parts in turns]
        rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template writes each image as the front end's raw-prompt image text; hand those back as PLACEHOLDER.
        image_text = self.engine.front_end.family.prompt_text(self.tokenizer, PLACEHOLDER, False)
        images = sum(kind == "image" for _, parts in turns for kind, _ in parts)
        if rendered.count(image_text) != images:
            raise APIError(400, "this engine's chat template does not write images the way its front end reads "
                                "them in a conversation: send one user message", code="unsupported_conversation")
        return rendered.replace(image_text, PLACEHOLDER), False

    def _too_long(self, length: int, job) -> APIError:
        return APIError(400, f"the prompt is {length} tokens and max_tokens {job.max_tokens}: more than the "
                             f"{self.max_model_len} this server allows (--max-model-len)",
                        code="context_length_exceeded")

    def sample(self, job) -> tuple[inputs.Sample, int]:
        """A Job -> (its runtime.inputs.Sample, as generate and the scheduler take it, prompt tokens S).
        APIError 400 for anything the engine cannot take; a prompt over
        --max-model-len is found once tokenized, before it is embedded or its images encoded.
        Runs in the server's prepare threads (app.py), not the scheduler's: it may take a while."""
        engine = self.engine
        if job.max_tokens > 1 and engine.decode_step is None:
            raise APIError(400, engine.no_decode_message() + "; or ask for max_tokens 1", code="no_decode")
        if job.sampling.stop and self.tokenizer is None:
            raise APIError(400, "stop strings need the engine's tokenizer; " + NO_TOKENIZER, code="no_tokenizer")
        room = self.max_model_len - job.max_tokens
        try:
            if job.prompt_ids is not None:
                if len(job.prompt_ids) > room:
                    raise self._too_long(len(job.prompt_ids), job)
                samples = inputs.parse(engine, torch.tensor(job.prompt_ids))
            else:
                if self.tokenizer is None:
                    raise APIError(400, NO_TOKENIZER, code="no_tokenizer")
                samples = engine.prepare(job.images or None, job.prompt, chat=job.chat,
                                         max_length=max(room, 0)).samples
        except PromptTooLongError as e:
            raise self._too_long(e.length, job) from e
        except (EngineInputError, PromptError) as e:
            raise APIError(400, str(e), code="invalid_prompt") from e
        sample = samples[0]
        if sample.length > room:
            raise self._too_long(sample.length, job)
        return sample, sample.length

    def decode(self, tokens: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(tokens, skip_special_tokens=True)
