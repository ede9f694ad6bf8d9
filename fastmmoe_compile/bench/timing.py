"""Timing: interleaved repetitions, medians, and the decode loops (our engine's and transformers')."""
from __future__ import annotations

import statistics
import time

import torch



def timer(device: torch.device):
    """seconds of fn(*args): on cuda with a synchronize before and after (kernels run async)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn, *args):
        sync()
        t = time.perf_counter()
        out = fn(*args)
        sync()
        return time.perf_counter() - t, out

    return timed


def interleaved(calls: dict, reps: int, log, what: str) -> dict:
    """{key: [result of calls[key]() per rep]}, the order rotated every rep."""
    results = {k: [] for k in calls}
    keys = list(calls)
    for r in range(reps):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            results[k].append(calls[k]())
        log(f"[bench] {what} rep {r + 1}/{reps}: " + ", ".join(
            f"{k[0][0]}/{k[1]} {_ms(results[k][-1]):.0f}" for k in keys))
    return results


def time_prefill(fns: dict, inputs: tuple, reps: int, log, timed=None) -> dict:
    """{key: [seconds of fns[key](*inputs) per rep]}, interleaved (timed: timer(device), default CPU)."""
    timed = timed or timer(torch.device("cpu"))
    return interleaved({k: (lambda fn=fn: timed(fn, *inputs)[0]) for k, fn in fns.items()}, reps, log, "prefill")


def _ms(x) -> float:
    return (statistics.median(x) if isinstance(x, list) else x) * 1e3


def decode_rep(starts: dict, steps: int, timed, rotation: int) -> tuple[dict, dict]:
    """One rep of every decoder, interleaved step by step (the order rotates every step), so
    that a burst of noise from other processes hits every variant alike: (seconds, tokens)."""
    runs = {k: start() for k, start in starts.items()}
    keys, times, tokens = list(starts), {k: [] for k in starts}, {k: [] for k in starts}
    for s in range(steps):
        r = (rotation + s) % len(keys)
        for k in keys[r:] + keys[:r]:
            dt, token = runs[k](timed)
            times[k].append(dt)
            tokens[k].append(token)
    return times, tokens


def engine_decoder(engine, prefill_out, seq: int, steps: int):
    """start() -> step(timed) -> (seconds, token): greedy decode from a variant's prefill output,
    a fresh state at every start."""
    from fastmmoe_compile.runtime.engine import PrefillResult

    logits, kept, *cache = prefill_out
    result = PrefillResult(logits, kept, [(cache[i], cache[i + 1]) for i in range(0, len(cache), 2)], seq)

    def start():
        state, token = engine.start_decode(result, steps), logits.argmax(-1)

        def step(timed):
            nonlocal token
            dt, out = timed(engine.decode, state, token[:, None])
            token = out.argmax(-1)
            return dt, int(token[0])

        return step

    return start


def hf_decoder(loaded, embeds: torch.Tensor, steps: int):
    """transformers' decode as users run it: one prefill into a DynamicCache, then one-token
    forwards with the cache; the cache is cropped back to the prompt before every run."""
    from ..transformers_compat import cache_kwargs, output_cache

    with torch.no_grad():
        out = loaded.lm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
    cache, first, seq = output_cache(out), out.logits[:, -1], embeds.shape[1]

    def one(token):
        with torch.no_grad():
            return loaded.lm(input_ids=token[:, None], use_cache=True, logits_to_keep=1,
                             **cache_kwargs(loaded.lm, cache)).logits[:, -1]

    def start():
        if cache.get_seq_length() > seq:
            cache.crop(seq - cache.get_seq_length())  # transformers 5: a negative count removes tokens
        token = first.argmax(-1)

        def step(timed):
            nonlocal token
            dt, logits = timed(one, token)
            token = logits.argmax(-1)
            return dt, int(token[0])

        return step

    return start
