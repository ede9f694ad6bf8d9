"""Continuous batching: one thread owns the engine and runs every request's prefill and decode.

Between decode steps the scheduler (1) admits waiting requests up to --max-batch: prepares their
inputs (front end: image processing, vision encoder), prefills them grouped by shape
(generate.prefill_samples), picks their first tokens and joins them to the running decode state
(runtime/batching.concat_states); (2) runs one decode step for every running request and picks
each one's next token with its own sampling settings; (3) lets finished (eos, stop string,
max_tokens) and cancelled (client gone) requests leave, freeing their cache rows (select_rows).
Requests talk to the HTTP side only through their Handle's event queue, so a request's failure
is its own error event, never the loop's end.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from ..runtime.batching import concat_states, ensure_room, select_rows
from ..runtime.generate import prefill_samples
from ..runtime.inputs import EngineInputError
from ..runtime.sampling import TextStream, logprobs, make_generator, sample
from .errors import APIError

log = logging.getLogger("fastmmoe_compile.serve")


class Handle:
    """One request as both sides see it. The scheduler thread puts events on `events` (through the
    HTTP side's event loop): ("token", text piece, token id, logprob), ("done", finish_reason),
    ("error", APIError). logprob: None, or (the token's log-probability, [(token id, log-probability)]
    of the job.logprobs most likely tokens) where the job asks for logprobs.
    prepared: (runtime.inputs.Sample, prompt tokens) of EngineIO.sample when the HTTP side prepared
    the request (off the scheduler thread); None: the scheduler prepares it at admission."""

    def __init__(self, job, loop: asyncio.AbstractEventLoop | None = None, on_event=None,
                 arrived: float | None = None):
        self.job = job
        self.loop = loop
        self.events: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self.on_event = on_event  # tests without an event loop: called in the scheduler thread
        self.cancelled = threading.Event()
        self.arrived = time.monotonic() if arrived is None else arrived  # time.monotonic() the request came in
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.vision_tokens = (0, 0)  # before / after token reduction
        self.finish_reason: str | None = None
        self.prepared: tuple | None = None

    def emit(self, event: tuple) -> None:
        if self.on_event is not None:
            self.on_event(event)
        if self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, event)
            except RuntimeError:  # the event loop has closed (server shutting down)
                pass

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Row:
    """A request in the running decode batch."""

    handle: Handle
    text: TextStream | None
    generator: object
    tokens: list = field(default_factory=list)
    done: bool = False


class Scheduler:
    def __init__(self, io, metrics, max_batch: int = 8, max_queue: int = 64):
        self.io = io
        self.engine = io.engine
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.waiting: collections.deque[Handle] = collections.deque()
        self.reserved = 0  # queue slots of requests being prepared (reserve)
        self.cond = threading.Condition()
        self.rows: list[_Row] = []
        self.state = None  # the running DecodeState, rows in self.rows' order
        self.next_tokens: torch.Tensor | None = None  # [B] the tokens the next decode step feeds
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="fastmmoe-scheduler", daemon=True)
        self.alive = False

    # --- the HTTP side ----------------------------------------------------------------------
    def _busy(self) -> APIError:
        return APIError(429, f"the server is busy: {len(self.waiting) + self.reserved} requests are already waiting "
                             "(--max-queue); retry later", code="queue_full", headers={"Retry-After": "1"})

    def reserve(self) -> None:
        """Take a queue slot for a request about to be parsed and prepared (tokenized, its images
        decoded and encoded), so that requests in preparation count against --max-queue too:
        APIError 429 when none is free. submit(handle, reserved=True) then uses the slot;
        release() gives it back where the request fails first."""
        with self.cond:
            if len(self.waiting) + self.reserved >= self.max_queue:
                raise self._busy()
            self.reserved += 1

    def release(self) -> None:
        with self.cond:
            self.reserved -= 1

    def submit(self, handle: Handle, reserved: bool = False) -> None:
        """Queue a request; APIError 429 (with Retry-After) when --max-queue requests already wait
        (reserved: it holds a slot from reserve(), which it now uses)."""
        with self.cond:
            if reserved:
                self.reserved -= 1
            elif len(self.waiting) + self.reserved >= self.max_queue:
                raise self._busy()
            self.waiting.append(handle)
            self.metrics.queue_depth.set(len(self.waiting))
            self.cond.notify()

    def cancel(self, handle: Handle) -> None:
        """The client has gone: a waiting request leaves the queue now, a running one at the next step."""
        handle.cancel()
        with self.cond:
            if handle in self.waiting:
                self.waiting.remove(handle)
                self.metrics.queue_depth.set(len(self.waiting))
                handle.finish_reason = "cancelled"

    def start(self) -> None:
        self.alive = True
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout)

    # --- the scheduler thread ---------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.waiting and not self.rows and not self.stopping:
                        self.cond.wait()
                    if self.stopping:
                        break
                    admitted = []
                    while self.waiting and len(self.rows) + len(admitted) < self.max_batch:
                        admitted.append(self.waiting.popleft())
                    self.metrics.queue_depth.set(len(self.waiting))
                try:
                    with torch.inference_mode():
                        if admitted:
                            self._admit(admitted)
                        if self.rows:
                            self._step()
                except Exception as e:  # noqa: BLE001  (a bug: fail the running requests, keep serving)
                    log.exception("a decode step failed")
                    for row in self.rows:
                        self._fail(row.handle, APIError(500, f"internal error in decode: {type(e).__name__}"))
                    self.rows, self.state, self.next_tokens = [], None, None
                    self.metrics.batch_size.set(0)
        except BaseException:
            log.exception("the scheduler stopped on an error")
            raise
        finally:
            self.alive = False
            for row in self.rows:
                self._fail(row.handle, APIError(503, "the server is shutting down", code="shutting_down"))
            with self.cond:
                while self.waiting:
                    self._fail(self.waiting.popleft(), APIError(503, "the server is shutting down",
                                                                code="shutting_down"))

    def _fail(self, handle: Handle, error: APIError) -> None:
        handle.finish_reason = "error"
        handle.emit(("error", error))

    def _admit(self, handles: list[Handle]) -> None:
        ready, samples = [], []
        for h in handles:
            if h.cancelled.is_set():
                h.emit(("done", "cancelled"))
                continue
            try:
                sample, h.prompt_tokens = h.prepared if h.prepared is not None else self.io.sample(h.job)
                h.prepared = None  # the scheduler holds the sample from here on
            except APIError as e:
                self._fail(h, e)
                continue
            except Exception as e:  # noqa: BLE001  (one request's failure is its own 500)
                log.exception("preparing a request failed")
                self._fail(h, APIError(500, f"internal error while preparing the request: {type(e).__name__}"))
                continue
            h.vision_tokens = (sample.vision_tokens, 0)
            ready.append(h)
            samples.append(sample)
        if not ready:
            return
        try:
            results: list = []
            logits, state = prefill_samples(self.engine, samples, 2, results)  # room for one decode step
        except Exception:  # noqa: BLE001
            if len(ready) == 1:
                self._prefill_failed(ready[0])
                return
            for h, sample in zip(ready, samples):  # find the one that fails: each alone
                try:
                    results = []
                    logits, state = prefill_samples(self.engine, [sample], 2, results)
                except Exception:  # noqa: BLE001
                    self._prefill_failed(h)
                    continue
                self._join([h], [sample], logits, state, results)
            return
        self._join(ready, samples, logits, state, results)

    def _prefill_failed(self, h: Handle) -> None:
        import sys

        error = sys.exc_info()[1]
        if isinstance(error, EngineInputError):
            self._fail(h, APIError(400, str(error), code="invalid_prompt"))
        else:
            log.exception("prefill failed")
            self._fail(h, APIError(500, f"internal error in prefill: {type(error).__name__}"))

    def _join(self, handles, samples, logits, state, results) -> None:
        rows = []
        for h, prompt, r in zip(handles, samples, results):
            before = prompt.vision_tokens
            kept = r.kept_positions[0]
            after = int(torch.isin(kept, prompt.vision).sum()) if before else 0
            h.vision_tokens = (before, after)
            self.metrics.prompt_tokens.inc(h.prompt_tokens)
            self.metrics.vision_tokens.labels("before").inc(before)
            self.metrics.vision_tokens.labels("after").inc(after)
            text = TextStream(self.io.tokenizer, h.job.sampling.stop) if self.io.tokenizer is not None else None
            rows.append(_Row(h, text, make_generator(h.job.sampling)))
        tokens = sample(logits, [r.handle.job.sampling for r in rows], [r.generator for r in rows])
        for i, (row, token) in enumerate(zip(rows, tokens.tolist())):
            self._token(row, token, self._logprob(row, logits[i], token))
        keep = [i for i, r in enumerate(rows) if not r.done]
        if not keep:
            return
        if state is None:  # cannot happen with room 2, but keep the invariant explicit
            raise RuntimeError("prefill returned no decode state")
        state = select_rows(state, keep) if len(keep) < len(rows) else state
        tokens = tokens[keep]
        rows = [rows[i] for i in keep]
        if self.state is None:
            self.state, self.next_tokens, self.rows = state, tokens, rows
        else:
            self.state = concat_states(self.state, state)
            self.next_tokens = torch.cat([self.next_tokens, tokens])
            self.rows = self.rows + rows
        self.metrics.batch_size.set(len(self.rows))

    def _step(self) -> None:
        self.state = ensure_room(self.state, 1)
        self.metrics.step_batch.observe(len(self.rows))
        logits = self.engine.decode(self.state, self.next_tokens[:, None])
        tokens = sample(logits, [r.handle.job.sampling for r in self.rows], [r.generator for r in self.rows],
                        [r.tokens for r in self.rows])  # what each has generated: its penalties count them
        for i, (row, token) in enumerate(zip(self.rows, tokens.tolist())):
            if row.handle.cancelled.is_set():
                row.done = True
                row.handle.finish_reason = "cancelled"
                row.handle.emit(("done", "cancelled"))
            else:
                self._token(row, token, self._logprob(row, logits[i], token))
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        if len(keep) < len(self.rows):
            self.state = select_rows(self.state, keep)
            self.rows = [self.rows[i] for i in keep]
            tokens = tokens[keep]
        self.next_tokens = tokens
        if not self.rows:
            self.state = self.next_tokens = None
        self.metrics.batch_size.set(len(self.rows))

    @staticmethod
    def _logprob(row: _Row, logits: torch.Tensor, token: int):
        """The token's logprob entry (Handle) where the request asks for logprobs, else None."""
        n = row.handle.job.logprobs
        return None if n is None else logprobs(logits, token, n)

    def _token(self, row: _Row, token: int, logprob=None) -> None:
        """One new token of a request: its text piece out, and whether it has finished."""
        h = row.handle
        now = time.monotonic()
        if h.first_token_at is None:
            h.first_token_at = now
            self.metrics.ttft.observe(now - h.arrived)
        h.last_token_at = now
        row.tokens.append(token)
        h.completion_tokens += 1
        self.metrics.generation_tokens.inc()
        piece = row.text.add(token) if row.text is not None else ""
        reason = None
        if token in self.io.eos or (row.text is not None and row.text.stopped):
            reason = "stop"
        elif h.completion_tokens >= h.job.max_tokens:
            reason = "length"
        if reason is not None and row.text is not None:
            piece += row.text.finish()
            reason = "stop" if row.text.stopped else reason  # a stop string seen only in the final text
        h.emit(("token", piece, token, logprob))
        if reason is not None:
            row.done = True
            h.finish_reason = reason
            if h.completion_tokens > 1:
                self.metrics.tpot.observe((h.last_token_at - h.first_token_at) / (h.completion_tokens - 1))
            h.emit(("done", reason))
