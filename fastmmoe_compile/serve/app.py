"""The HTTP side: OpenAI's chat completions and completions over Starlette, plus /health and /metrics.

Handlers read a request, take a queue slot (429 when none is free), then parse and check it
(protocol.py: a prompt that cannot fit --max-model-len is refused from its length before anything
is tokenized or decoded) and prepare it (EngineIO.sample: tokenize, refuse it if too long, decode
and encode its images, embed) in the server's PREPARE_THREADS worker threads, never on the event
loop nor on the scheduler's thread: a slow request delays no other's generation. They then queue it
on the scheduler, and turn its events into a JSON response or server-sent events
("data: {chunk}" lines, "data: [DONE]" last). A streaming request waits for its first event before
answering, so a request the engine refuses is still a plain 4xx. A client that goes away cancels
its request. Each finished request writes one JSON log line (logger fastmmoe_compile.serve.access).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .errors import APIError
from .protocol import Limits, parse_chat, parse_completion
from .scheduler import Handle

access_log = logging.getLogger("fastmmoe_compile.serve.access")
POLL_S = 0.5  # how often a waiting handler checks that its client is still there
# Requests parsed and prepared at once. Each holds at most its body, its decoded images and its
# embeddings (README "Serve": the memory bound); two keep a slow one from holding up the next.
PREPARE_THREADS = 2


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def read_json(request: Request, max_bytes: int):
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= max_bytes:
            chunks.append(chunk)
    # An oversized body is read to its end but not kept: answering before the client has sent it
    # all breaks the pipe under many clients (Python's urllib, for one), which then never see the 413.
    if size > max_bytes:
        raise APIError(413, f"the request body is {size} bytes; at most {max_bytes} (--max-body-bytes)",
                       code="body_too_large")
    data = b"".join(chunks)
    del chunks
    try:  # a body of megabytes takes a while to parse: not on the event loop
        return await run_in_threadpool(json.loads, data)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from e


class Server:
    """The ASGI app (`.app`) of one engine: io (engine_io.EngineIO), scheduler, metrics."""

    def __init__(self, io, scheduler, metrics, limits: Limits, api_key: str | None = None,
                 max_body_bytes: int = 32 * 2 ** 20):
        self.io, self.scheduler, self.metrics, self.limits = io, scheduler, metrics, limits
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())
        self.prepare_pool = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="fastmmoe-prepare")
        self.app = Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ], exception_handlers={404: self.not_found, 405: self.not_allowed})

    # --- small endpoints --------------------------------------------------------------------
    async def not_found(self, request, exc):
        return error_response(APIError(404, f"no route {request.url.path}", code="not_found"))

    async def not_allowed(self, request, exc):
        return error_response(APIError(405, f"{request.method} is not allowed on {request.url.path}",
                                       code="method_not_allowed"))

    async def health(self, request):
        if not self.scheduler.alive:
            return JSONResponse({"status": "scheduler stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def prometheus(self, request):
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def _authorize(self, request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key")

    async def models(self, request):
        try:
            self._authorize(request)
        except APIError as e:
            return error_response(e)
        return JSONResponse({"object": "list", "data": [{"id": self.io.name, "object": "model",
                                                         "created": self.created, "owned_by": "fastmmoe-compile"}]})

    # --- generation -------------------------------------------------------------------------
    async def chat(self, request):
        return await self._generate(request, "chat")

    async def completions(self, request):
        return await self._generate(request, "completion")

    async def _generate(self, request: Request, kind: str):
        endpoint = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        arrived = time.monotonic()  # TTFT counts from here: reading and checking the request included
        handle = None
        try:
            self._authorize(request)
            body = await read_json(request, self.max_body_bytes)
            self.scheduler.reserve()  # 429 before any work when the queue is full
            try:
                job, prepared = await asyncio.get_running_loop().run_in_executor(self.prepare_pool, self._prepare,
                                                                                  kind, body)
            except BaseException:
                self.scheduler.release()
                raise
            del body
            handle = Handle(job, asyncio.get_running_loop(), arrived=arrived)
            handle.prepared, handle.prompt_tokens = prepared, prepared[1]
            self.scheduler.submit(handle, reserved=True)
            first = await self._next(handle, request)
            if first is None:
                return self._finish(rid, endpoint, handle, 499, Response(status_code=499))
            if first[0] == "error":
                raise first[1]
        except APIError as e:
            return self._finish(rid, endpoint, handle, e.status, error_response(e))
        except ClientDisconnect:
            if handle is not None:
                self.scheduler.cancel(handle)
            return self._finish(rid, endpoint, handle, 499, Response(status_code=499))
        if job.stream:
            return StreamingResponse(self._sse(rid, endpoint, kind, handle, first), media_type="text/event-stream")
        return await self._complete(rid, endpoint, kind, handle, first, request)

    def _prepare(self, kind: str, body):
        """In a prepare thread: (Job, (sample, prompt tokens)) of a request body; APIError for a bad one."""
        if kind == "chat":
            job = parse_chat(body, self.io.name, self.limits, self.io.conversation)
        else:
            job = parse_completion(body, self.io.name, self.limits)
        try:
            return job, self.io.sample(job)
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001  (one request's failure is its own 500)
            logging.getLogger("fastmmoe_compile.serve").exception("preparing a request failed")
            raise APIError(500, f"internal error while preparing the request: {type(e).__name__}") from e

    async def _next(self, handle: Handle, request: Request):
        """The request's next event; None (and the request cancelled) once its client has gone."""
        while True:
            try:
                return await asyncio.wait_for(handle.events.get(), POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.scheduler.cancel(handle)
                    return None

    # --- logprobs, in OpenAI's two formats ---------------------------------------------------
    def _chat_logprobs(self, entries: list) -> dict:
        """[(token id, (logprob, [(id, logprob)]))] -> chat's {"content": [...]}."""
        def one(token, logprob):
            text = self.io.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**one(token, lp), "top_logprobs": [one(t, p) for t, p in top]}
                            for token, (lp, top) in entries], "refusal": None}

    def _completion_logprobs(self, entries: list, offset: int = 0) -> dict:
        """[(token id, (logprob, [(id, logprob)]))] -> completions' {"tokens", "token_logprobs",
        "top_logprobs" (the alternatives and the chosen token, by text), "text_offset"} (each token's
        offset: the lengths of the tokens' texts before it, from `offset`)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, (lp, top) in entries:
            text = self.io.token_text(token)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append({**{self.io.token_text(t): p for t, p in top}, text: lp})
            out["text_offset"].append(offset)
            offset += len(text)
        return out

    async def _complete(self, rid, endpoint, kind, handle, event, request):
        text, tokens, entries = [], [], []
        while event[0] == "token":
            text.append(event[1])
            tokens.append(event[2])
            if event[3] is not None:
                entries.append((event[2], event[3]))
            event = await self._next(handle, request)
            if event is None:
                return self._finish(rid, endpoint, handle, 499, Response(status_code=499))
        if event[0] == "error":
            return self._finish(rid, endpoint, handle, event[1].status, error_response(event[1]))
        reason = event[1]
        logprobs = None
        if handle.job.logprobs is not None:
            logprobs = self._chat_logprobs(entries) if kind == "chat" else self._completion_logprobs(entries)
        choice = ({"index": 0, "message": {"role": "assistant", "content": "".join(text)}, "finish_reason": reason,
                   "logprobs": logprobs} if kind == "chat" else
                  {"index": 0, "text": "".join(text), "finish_reason": reason, "logprobs": logprobs,
                   "token_ids": tokens})
        body = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": self.io.name, "choices": [choice], "usage": self._usage(handle)}
        return self._finish(rid, endpoint, handle, 200, JSONResponse(body))

    async def _sse(self, rid, endpoint, kind, handle, event):
        created, status = int(time.time()), 499
        offset = [0]  # completions' text_offset runs on across chunks

        def chunk(piece=None, reason=None, token=None, usage=None, logprob=None):
            entries = [] if logprob is None else [(token, logprob)]
            if kind == "chat":
                delta = {} if piece is None else ({"role": "assistant", "content": piece} if token is None
                                                  else {"content": piece})
                logprobs = self._chat_logprobs(entries) if entries else None
                choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": reason,
                                             "logprobs": logprobs}]
                obj = "chat.completion.chunk"
            else:
                logprobs = None
                if entries:
                    logprobs = self._completion_logprobs(entries, offset[0])
                    offset[0] += sum(len(t) for t in logprobs["tokens"])
                choices = [] if usage else [{"index": 0, "text": piece or "", "finish_reason": reason,
                                             "logprobs": logprobs, **({} if token is None else {"token_ids": [token]})}]
                obj = "text_completion"
            data = {"id": rid, "object": obj, "created": created, "model": self.io.name, "choices": choices}
            if usage:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n"

        try:
            if kind == "chat":
                yield chunk("")  # the role first, as OpenAI's first chunk
            while event[0] == "token":
                yield chunk(event[1], token=event[2], logprob=event[3])
                event = await handle.events.get()
            if event[0] == "error":
                status = event[1].status
                yield f"data: {json.dumps(event[1].body())}\n\n"
                return
            if event[1] == "cancelled":
                return
            yield chunk(reason=event[1])
            if handle.job.include_usage:
                yield chunk(usage=self._usage(handle))
            yield "data: [DONE]\n\n"
            status = 200
        finally:  # also when the client disconnects (the response task is cancelled)
            if status == 499:
                self.scheduler.cancel(handle)
            self._finish(rid, endpoint, handle, status, None)

    @staticmethod
    def _usage(handle) -> dict:
        return {"prompt_tokens": handle.prompt_tokens, "completion_tokens": handle.completion_tokens,
                "total_tokens": handle.prompt_tokens + handle.completion_tokens}

    def _finish(self, rid, endpoint, handle, status, response):
        """Count the request, write its log line, return the response."""
        self.metrics.requests.labels(endpoint, str(status)).inc()
        record = {"event": "request", "id": rid, "endpoint": endpoint, "status": status}
        if handle is not None:
            first = handle.first_token_at
            record.update(prompt_tokens=handle.prompt_tokens, completion_tokens=handle.completion_tokens,
                          vision_tokens_before=handle.vision_tokens[0], vision_tokens_after=handle.vision_tokens[1],
                          finish_reason=handle.finish_reason, images=len(handle.job.images),
                          ttft_s=None if first is None else round(first - handle.arrived, 4),
                          duration_s=round(time.monotonic() - handle.arrived, 4))
        access_log.info(json.dumps(record))
        return response
