"""Token sampling and stop strings, shared by Engine.generate and the server (fastmmoe_compile.serve).

Sampling follows the usual logits-processor order (Hugging Face's LogitsProcessorList and vLLM's
sampler): subtract the presence and frequency penalties (OpenAI's definition: for each token j
already generated c[j] times, logits[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty;
only the sample's own generated tokens count, not its prompt), divide by the temperature, keep the top_k largest logits, keep the smallest set of
tokens whose probability mass reaches top_p (nucleus sampling, Holtzman et al. 2019, "The Curious
Case of Neural Text Degeneration"), then draw from the softmax. temperature == 0 is greedy:
exactly argmax (of the penalised logits where a penalty is set), as Engine.generate always did. Each sample draws from its own torch.Generator
seeded with its seed, so its tokens do not depend on what else shares the batch.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, fields

import torch

from .inputs import EngineInputError, EngineInputTypeError, given


@dataclass(frozen=True)
class SamplingParams:
    """One sample's sampling settings.

    temperature: >= 0; 0 is greedy (argmax). top_p: in (0, 1]; 1 keeps every token. top_k: >= 0;
    0 keeps every token. seed: an int for reproducible draws (same seed, same tokens), None for a
    fresh random seed. stop: strings that end the text (not included in it); they need a tokenizer.
    presence_penalty, frequency_penalty: in [-2, 2] (OpenAI's range), subtracted from the logits of
    tokens already generated (once, and once per occurrence); 0 (the default) changes nothing.
    EngineInputError for any value outside these ranges.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self):
        def number(name, value, ok, expected):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not ok(value):
                raise EngineInputError(f"{name} must be {expected}, got {value!r}")

        number("temperature", self.temperature, lambda v: v >= 0, "a number >= 0 (0 is greedy)")
        number("top_p", self.top_p, lambda v: 0 < v <= 1, "a number in (0, 1]")
        number("presence_penalty", self.presence_penalty, lambda v: -2 <= v <= 2, "a number in [-2, 2]")
        number("frequency_penalty", self.frequency_penalty, lambda v: -2 <= v <= 2, "a number in [-2, 2]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise EngineInputError(f"top_k must be an int >= 0 (0 keeps every token), got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise EngineInputError(f"seed must be an int or None, got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if stop is None:
            stop = ()
        if not isinstance(stop, (list, tuple)) or any(not isinstance(s, str) or not s for s in stop):
            raise EngineInputError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def argmax_only(self) -> bool:
        """Greedy on the logits as they come: no sampler needed."""
        return self.greedy and not self.penalized


GREEDY = SamplingParams()


def sampling_params(sampling, keywords: dict) -> tuple[SamplingParams, dict]:
    """Engine.generate's sampling settings: `sampling` (a SamplingParams, or None), or SamplingParams'
    fields among `keywords` (the shorthand temperature=0.7, seed=1, ...; a None value is the field's
    default only where the field takes None), not both: EngineInputError. Returns the settings and
    the other keywords (the engine's extra inputs)."""
    names = {f.name for f in fields(SamplingParams)}
    flat = {k: v for k, v in keywords.items() if k in names}
    rest = {k: v for k, v in keywords.items() if k not in names}
    if sampling is None:
        return (SamplingParams(**flat) if flat else GREEDY), rest
    if not isinstance(sampling, SamplingParams):
        raise EngineInputTypeError(f"sampling must be a runtime.sampling.SamplingParams, got {given(sampling)}")
    both = [k for k, v in flat.items() if v is not None]
    if both:
        raise EngineInputError(f"pass sampling= or its settings as keywords ({', '.join(both)}=), not both")
    return sampling, rest


class Sampler:
    """Picks each sample's next token from its logits: sampler(logits [B, V]) -> token ids [B] int64.
    Rows may come and go between calls (the server's continuous batching): `params` and
    `generators` are lists the caller keeps in row order (select / extend)."""

    def __init__(self, params: list[SamplingParams]):
        self.params = list(params)
        self.generators = [make_generator(p) for p in self.params]
        self.histories: list[list[int]] = [[] for _ in self.params]  # each row's tokens so far (penalties)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        tokens = sample(logits, self.params, self.generators, self.histories)
        for history, token in zip(self.histories, tokens.tolist()):
            history.append(token)
        return tokens


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A CPU generator seeded with params.seed (a random seed when None); None for greedy."""
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return torch.Generator().manual_seed(seed % (1 << 63))


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list,
           histories: list | None = None) -> torch.Tensor:
    """logits [B, V] (any float dtype) -> next token ids [B] int64, row i drawn with params[i] and
    generators[i] (make_generator). histories[i]: the token ids row i has generated so far, which
    its penalties count (None: no history, no penalty). Greedy rows without penalties are
    logits.argmax(-1), bit for bit."""
    tokens = logits.argmax(dim=-1)
    for i, (p, g) in enumerate(zip(params, generators)):
        row = logits[i]
        if p.penalized and histories is not None and len(histories[i]):
            row = penalize(row.float(), p, histories[i])
            if p.greedy:
                tokens[i] = row.argmax()
        if not p.greedy:
            tokens[i] = _draw(row.float(), p, g)
    return tokens


def penalize(logits: torch.Tensor, p: SamplingParams, history) -> torch.Tensor:
    """logits [V] float -> logits minus OpenAI's presence and frequency penalties for the tokens in
    history (a list or 1-D tensor of ids in [0, V))."""
    ids = torch.as_tensor(history, dtype=torch.long, device=logits.device)
    counts = torch.bincount(ids, minlength=logits.shape[-1])[:logits.shape[-1]].to(logits.dtype)
    return logits - counts * p.frequency_penalty - (counts > 0).to(logits.dtype) * p.presence_penalty


def logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The model's log-probability of `token` under logits [V] (log_softmax in float32, before
    temperature, top-k/p and penalties: what the model itself gave, as vLLM reports by default),
    and the `top` most likely (token id, log-probability) pairs, most likely first."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(lp, min(top, lp.shape[-1])) if top > 0 else None
    alternatives = [] if best is None else list(zip(best.indices.tolist(), best.values.tolist()))
    return float(lp[token]), alternatives


def _draw(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    logits = logits.cpu() / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


class TextStream:
    """Incremental detokenization of one sample with stop strings.

    add(token) -> the new text that is safe to show: text is held back while the last token ends
    inside a multi-byte character (the decode ends in U+FFFD) or while its end could be the start of
    a stop string. After a stop string appears, `stopped` is True and the text ends before it.
    finish() -> what was held back (nothing after a stop). `text` is everything shown so far.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.tokens: list[int] = []
        self.text = ""  # shown so far
        self.stopped = False
        self._stop_at = 0
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(int(token))
        # A trailing U+FFFD may be a character whose other bytes are still to come: not final yet.
        stable = self._decoded().rstrip("\ufffd")
        if self._cut(stable):
            return self._show(stable[:self._stop_at])
        return self._show(stable[:len(stable) - self._hold] if self._hold else stable)

    def finish(self) -> str:
        if self.stopped:
            return ""
        full = self._decoded()
        self._cut(full)
        return self._show(full if not self.stopped else full[:self._stop_at])

    def _cut(self, text: str) -> bool:
        """Whether a stop string occurs in text; if so, stopped, and text up to it is final."""
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if found:
            self.stopped, self._stop_at = True, min(found)
        return bool(found)

    def _show(self, upto: str) -> str:
        if len(upto) <= len(self.text) or not upto.startswith(self.text):
            return ""
        piece, self.text = upto[len(self.text):], upto
        return piece
