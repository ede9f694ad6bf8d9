"""Decode and greedy generation over an engine's prefill and decode programs.

After a pruned prefill every layer has its own cache length (layer l holds the tokens
that reached layer l), so the state keeps one buffer per layer. Buffers are seq-major,
[capacity, B, heads, dim], preallocated for the whole generation: a step passes each
layer's `buffer[:L]` (a contiguous view, no copy), gets back only the new rows and writes
them at slot L. Samples of different lengths share a batch with padding slots masked per
layer; new tokens take slot L in every sample, so holes stay where prefill left them.
Rotary positions continue from each sample's original prompt length (kept tokens keep
their original positions; nothing is re-indexed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch.utils._pytree import tree_leaves

from ..errors import UserInputError
from . import inputs
from .sampling import GREEDY, SamplingParams


class DecodeUnavailableError(UserInputError, RuntimeError):
    """The engine has no decode program, or the prefill result carries no KV cache."""


@dataclass(frozen=True)
class GenerateParams:
    """What a generate call asks for besides its inputs, checked once (GenerateParams.of) and passed
    down as one value: max_new_tokens >= 1, the eos token ids, the sampling settings."""

    max_new_tokens: int
    eos: frozenset = frozenset()
    sampling: SamplingParams = GREEDY

    @classmethod
    def of(cls, max_new_tokens, eos_token_id=None, sampling: SamplingParams | None = None) -> "GenerateParams":
        """EngineInputError for a max_new_tokens that is no int >= 1, or an eos_token_id that is no
        token id or list of them."""
        return cls(inputs.positive_int("max_new_tokens", max_new_tokens),
                   inputs.token_id_set("eos_token_id", eos_token_id), sampling or GREEDY)


@dataclass
class DecodeState:
    keys: list[torch.Tensor]  # per layer [capacity, B, heads, dim], seq-major
    values: list[torch.Tensor]
    masks: list[torch.Tensor]  # per layer [B, capacity] bool: the slot holds a token of that sample
    lengths: list[int]  # per layer: slots in use (the same for every sample; shorter samples have holes)
    positions: torch.Tensor  # [B] int64: the rotary position of each sample's next token

    @property
    def batch(self) -> int:
        return int(self.positions.shape[0])

    def steps_left(self) -> int:
        return min(k.shape[0] - n for k, n in zip(self.keys, self.lengths))


def start_state(results: Sequence, max_new_tokens: int) -> DecodeState:
    """A decode state for the samples of one or more prefill results, in order, with room for
    max_new_tokens decode steps. Each result may hold a batch (equal lengths within it)."""
    if not results:
        raise ValueError("start_state needs at least one prefill result")
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for r in results:
        if getattr(r, "cache", None) is None or getattr(r, "prompt_length", None) is None:
            raise DecodeUnavailableError(
                "this prefill result carries no KV cache: the engine was compiled without a decode program "
                "(before decode existed, or with decode=False / --no-decode); recompile it to decode")
    layers = len(results[0].cache)
    if any(len(r.cache) != layers for r in results):
        raise ValueError("prefill results come from engines with different layer counts")
    batch = sum(r.logits.shape[0] for r in results)
    keys, values, masks, lengths = [], [], [], []
    for layer in range(layers):
        k0, v0 = results[0].cache[layer]
        longest = max(r.cache[layer][0].shape[2] for r in results)
        capacity = longest + int(max_new_tokens)
        kbuf = k0.new_zeros(capacity, batch, k0.shape[1], k0.shape[3])
        vbuf = v0.new_zeros(capacity, batch, v0.shape[1], v0.shape[3])
        mask = torch.zeros(batch, capacity, dtype=torch.bool, device=k0.device)
        row = 0
        for r in results:
            k, v = r.cache[layer]
            n, length = k.shape[0], k.shape[2]
            kbuf[:length, row:row + n] = k.permute(2, 0, 1, 3)
            vbuf[:length, row:row + n] = v.permute(2, 0, 1, 3)
            mask[row:row + n, :length] = True
            row += n
        keys.append(kbuf)
        values.append(vbuf)
        masks.append(mask)
        lengths.append(longest)
    positions = torch.cat([torch.full((r.logits.shape[0],), int(r.prompt_length), dtype=torch.long)
                           if getattr(r, "next_positions", None) is None else r.next_positions.to(torch.long)
                           for r in results])
    return DecodeState(keys, values, masks, lengths, positions)


def decode_step(step, state: DecodeState, inputs_embeds: torch.Tensor) -> torch.Tensor:
    """Run one token per sample through `step` (the decode program), append its K/V rows to
    `state` in place, and return the next-token logits [B, V]."""
    if not isinstance(state, DecodeState):
        raise TypeError(f"decode needs the DecodeState from engine.start_decode(prefill results), got {type(state)}")
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[:2] != (state.batch, 1):
        raise ValueError(f"decode takes one token per sample: inputs_embeds [{state.batch}, 1, H], "
                         f"got {list(inputs_embeds.shape)}")
    if state.steps_left() < 1:
        raise ValueError("the decode state is full: start it with a larger max_new_tokens")
    n = len(state.keys)
    out = step(inputs_embeds.contiguous(), state.positions[:, None].contiguous(),
               [k[:length] for k, length in zip(state.keys, state.lengths)],
               [v[:length] for v, length in zip(state.values, state.lengths)],
               [m[:, :length].contiguous() for m, length in zip(state.masks, state.lengths)])
    leaves = tree_leaves(out)  # AOTInductor, the ExportedProgram and torch.compile may nest differently
    logits, new_keys, new_values = leaves[0], leaves[1:1 + n], leaves[1 + n:1 + 2 * n]
    for layer in range(n):
        slot = state.lengths[layer]
        state.keys[layer][slot] = new_keys[layer][:, :, 0]
        state.values[layer][slot] = new_values[layer][:, :, 0]
        state.masks[layer][:, slot] = True
        state.lengths[layer] = slot + 1
    state.positions += 1
    return logits


# --- greedy generation -----------------------------------------------------------------

def prefill_samples(engine, samples: list, max_new_tokens: int, results: list | None = None):
    """Prefill samples (runtime.inputs.Sample) grouped by shape (S, N) (the prefill program needs
    equal shapes in a batch) and return the first tokens' logits [B, V] and a decode state, both in
    sample order. `results`, if given, receives each sample's PrefillResult (kept_positions: what
    token reduction kept)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, sample in enumerate(samples):
        groups.setdefault(sample.shape, []).append(i)
    per_sample = [None] * len(samples)
    for rows in groups.values():
        result = engine.prefill(samples=[samples[i] for i in rows])
        for j, i in enumerate(rows):
            per_sample[i] = _row(result, j)
    if results is not None:
        results.extend(per_sample)
    logits = torch.cat([r.logits for r in per_sample])
    # The first new token comes from prefill: max_new_tokens - 1 decode steps follow (none: no state).
    return logits, start_state(per_sample, max_new_tokens - 1) if max_new_tokens > 1 else None


def _row(result, j):
    cache = None if result.cache is None else [(k[j:j + 1], v[j:j + 1]) for k, v in result.cache]
    return type(result)(result.logits[j:j + 1], result.kept_positions[j:j + 1], cache, result.prompt_length,
                        None if result.next_positions is None else result.next_positions[j:j + 1])


def greedy(engine, samples, params: GenerateParams, sampler=None) -> Iterator[list]:
    """Yield, per step, each sample's new token (None once the sample has ended with eos).
    sampler: a runtime.sampling.Sampler (logits [B, V] -> tokens [B]); None is argmax."""
    max_new_tokens, eos = params.max_new_tokens, params.eos
    logits, state = prefill_samples(engine, samples, max_new_tokens)
    done = [False] * len(samples)
    for step in range(max_new_tokens):
        tokens = logits.argmax(dim=-1) if sampler is None else sampler(logits)
        out = [None if d else int(t) for d, t in zip(done, tokens.tolist())]
        done = [d or t in eos for d, t in zip(done, tokens.tolist())]
        yield out
        if all(done) or step == max_new_tokens - 1:
            return
        logits = engine.decode(state, tokens[:, None])


def generate(engine, samples: list, params: GenerateParams, stream: bool = False):
    """Engine.generate on parsed samples (runtime.inputs.parse), as `params` says (the same sampling
    for every sample). Every error is raised here, at the call (not at a stream's first step)."""
    if engine.embeddings is None and params.max_new_tokens > 1:
        raise inputs.EngineInputError("this engine was built without its token embeddings: it cannot feed "
                                      "generated tokens back")
    if engine.decode_step is None and params.max_new_tokens > 1:
        raise DecodeUnavailableError(engine.no_decode_message())
    sampler = None
    if not params.sampling.argmax_only:
        from .sampling import Sampler

        sampler = Sampler([params.sampling] * len(samples))
    steps = greedy(engine, samples, params, sampler)
    if stream:
        return steps
    tokens = [[] for _ in samples]
    for out in steps:
        for i, t in enumerate(out):
            if t is not None:
                tokens[i].append(t)
    return [torch.tensor(t, dtype=torch.long) for t in tokens]
