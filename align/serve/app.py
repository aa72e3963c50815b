"""The OpenAI-compatible HTTP API of ``align serve`` (FastAPI).

``POST /v1/chat/completions`` and ``POST /v1/completions`` (server-sent events when ``stream``
is true: OpenAI's chunks, then ``data: [DONE]``), ``GET /v1/models`` (the model card lists the
objectives), ``GET /health``. Every request may carry its own ``preference`` (α); a bad
request is a 4xx whose JSON body says what is wrong (OpenAI's ``{"error": {...}}`` shape).

Bounds (:class:`Flight`): at most ``max_batch`` requests decode and ``max_queue`` wait (then a
429 with ``Retry-After``), each for at most ``request_timeout`` seconds (then a 504, or an error
event ending its stream); a client that goes away frees its row at the next step. At shutdown
(:class:`GracefulServer`, on SIGTERM) new requests get a 503 and those in flight a bounded time
to finish. The API key, the body size limit and the shutdown gate are :mod:`align.serve.guard`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from align.serve.guard import DEFAULT_MAX_BODY_BYTES, Guard
from align.serve.scheduler import Job, Outcome, Scheduler
from align.serve.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    parse_body,
    to_generation,
)

DEFAULT_MAX_QUEUE = 64


def create_app(
    served: Any,
    max_batch: int = 16,
    *,
    api_key: str | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    request_timeout: float | None = None,
) -> FastAPI:
    """The app serving ``served`` (a :class:`~align.serve.served.ServedModel`); its model
    thread starts and stops with the app (the ASGI lifespan)."""
    scheduler = Scheduler(served, max_batch=max_batch)
    flight = Flight(scheduler, max_queue=max_queue, request_timeout=request_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            # Bounded: the worker is a daemon thread, a step still running past it ends with us.
            scheduler.stop(timeout=5.0)

    app = FastAPI(title="align serve", lifespan=lifespan)
    app.add_middleware(
        Guard, api_key=api_key, max_body_bytes=max_body_bytes, closing=lambda: flight.closing
    )
    app.state.served, app.state.scheduler, app.state.flight = served, scheduler, flight
    created = int(time.time())

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            RequestError(str(error.detail), status=error.status_code).body(),
            status_code=error.status_code,
        )

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        body = RequestError(
            f"internal error: {type(error).__name__}: {error}", status=500, kind="server_error"
        ).body()
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the model's worker thread runs (503 if it died), with what the batching
        did so far."""
        alive = scheduler.alive
        body = {
            "status": "ok" if alive else "error: the model worker is not running",
            "model": served.name,
            "max_batch": scheduler.max_batch,
            "max_queue": flight.max_queue,
            "in_flight": len(flight.jobs),
            "waiting": scheduler.waiting,
            **asdict(scheduler.stats),
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    def model_card() -> dict[str, Any]:
        return {
            "id": served.name,
            "object": "model",
            "created": created,
            "owned_by": "align",
            **served.card(),
            "max_batch": scheduler.max_batch,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != served.name:
            raise RequestError(
                f"the model {model_id!r} does not exist; this server serves {served.name!r}",
                status=404,
                param="model",
                code="model_not_found",
            )
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = parse_body(await request.body(), ChatCompletionRequest)
        generation = to_generation(body, served, served.encode_chat(body.messages))
        reply = _Reply("chat.completion", "chatcmpl", served.name, body)
        return await _respond(reply, flight, flight.admit(generation), request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse_body(await request.body(), CompletionRequest)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise RequestError(
                    f"prompt must be one string (one request per prompt), got {len(prompt)}",
                    param="prompt",
                )
            prompt = prompt[0]
        generation = to_generation(body, served, served.encode_text(prompt))
        reply = _Reply("text_completion", "cmpl", served.name, body)
        return await _respond(reply, flight, flight.admit(generation), request)

    return app


class Flight:
    """The requests admitted and not yet answered (on the event loop): the queue bound, the
    time limit, and the drain at shutdown. A request leaves with :meth:`release`, whatever
    ended it; its row then leaves the batch at the next step."""

    def __init__(self, scheduler: Scheduler, *, max_queue: int, request_timeout: float | None):
        if max_queue < 0:
            raise ValueError(f"max queue must be >= 0, got {max_queue}")
        if request_timeout is not None and request_timeout <= 0:
            raise ValueError(f"request timeout must be > 0 seconds, got {request_timeout}")
        self.scheduler = scheduler
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self.jobs: dict[Job, asyncio.TimerHandle | None] = {}
        self.closing = False

    def admit(self, generation: Any) -> Job:
        if self.closing:  # the guard refuses first; this covers a request admitted mid-drain
            raise RequestError(
                "the server is shutting down", status=503, kind="server_error", code="shutting_down"
            )
        if not self.scheduler.alive:
            raise RequestError(
                "the model worker is not running; restart the server",
                status=503,
                kind="server_error",
            )
        if len(self.jobs) >= self.scheduler.max_batch + self.max_queue:
            raise RequestError(
                f"the server is busy: {self.scheduler.max_batch} requests decoding and "
                f"{self.max_queue} waiting (--max-queue); retry shortly",
                status=429,
                kind="rate_limit_error",
                code="queue_full",
                # A row frees every few steps; a second is a sensible first back-off.
                headers={"Retry-After": "1"},
            )
        job = self.scheduler.submit(generation)
        timer = None
        if self.request_timeout is not None:
            error = RequestError(
                f"the request did not finish within the server's time limit of "
                f"{self.request_timeout:g} s (--request-timeout); it was cancelled",
                status=504,
                kind="server_error",
                code="request_timeout",
            )
            loop = asyncio.get_running_loop()
            timer = loop.call_later(self.request_timeout, self.abort, job, error)
        self.jobs[job] = timer
        return job

    def abort(self, job: Job, error: RequestError) -> None:
        """End ``job`` now with ``error`` (what its reply sends instead of the rest)."""
        if job in self.jobs:
            job.cancel()
            job.events.put_nowait(("abort", error))

    def release(self, job: Job) -> None:
        job.cancel()  # a no-op once finished; else the row leaves at the next step
        timer = self.jobs.pop(job, None)
        if timer is not None:
            timer.cancel()

    async def drain(self, grace: float) -> None:
        """Refuse new requests (503), give those in flight ``grace`` seconds to finish, then
        cancel the rest with an error their clients get (a 503, or an error event)."""
        self.closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.jobs and loop.time() < deadline:
            await asyncio.sleep(0.05)
        error = RequestError(
            "the server is shutting down; this request was cancelled before it finished",
            status=503,
            kind="server_error",
            code="shutting_down",
        )
        for job in list(self.jobs):
            self.abort(job, error)
        deadline = loop.time() + 1.0  # for the cancelled replies to reach their clients
        while self.jobs and loop.time() < deadline:
            await asyncio.sleep(0.02)


class GracefulServer(uvicorn.Server):
    """uvicorn, but a first SIGTERM (or Ctrl-C) drains :class:`Flight` for at most
    ``shutdown_timeout`` seconds, then stops, and the process exits 0. (uvicorn itself stops
    at once and re-raises the signal afterwards: exit status 143.) A second signal stops at
    once."""

    def __init__(self, config: uvicorn.Config, flight: Flight, shutdown_timeout: float):
        super().__init__(config)
        self.flight = flight
        self.shutdown_timeout = shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._draining or self._loop is None:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        # A signal handler runs between two steps of the loop: hand the drain to the loop.
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

    async def _drain(self) -> None:
        try:
            await self.flight.drain(self.shutdown_timeout)
        finally:
            self.should_exit = True


async def _respond(reply: _Reply, flight: Flight, job: Job, request: Request) -> Any:
    if reply.body.stream:
        return _EventStream(reply.stream(job), release=lambda: flight.release(job))
    # A client waiting for a whole answer is heard going away only if someone listens.
    watcher = asyncio.ensure_future(_on_disconnect(request, flight, job))
    try:
        return JSONResponse(await reply.whole(job))
    finally:
        watcher.cancel()
        flight.release(job)


async def _on_disconnect(request: Request, flight: Flight, job: Job) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    flight.abort(job, RequestError("the client closed the connection", status=499))


class _EventStream(StreamingResponse):
    """Server-sent events that release their request however the response ends: finished,
    the client gone (Starlette then cancels the stream, possibly before it ever started, so
    the generator's own cleanup is not enough), or the server stopping."""

    def __init__(self, events: AsyncIterator[str], release: Callable[[], None]):
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


class _Reply:
    """The response objects of one request: a whole completion or its stream of chunks."""

    def __init__(self, kind: str, prefix: str, model: str, body: Any):
        self.chat = kind == "chat.completion"
        self.kind = kind
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.body = body

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _extra(self, outcome: Outcome) -> dict[str, Any]:
        return {"token_ids": outcome.token_ids} if self.body.return_token_ids else {}

    async def whole(self, job: Job) -> dict[str, Any]:
        pieces: list[str] = []
        while True:
            event = await job.events.get()
            if event[0] == "text":
                pieces.append(event[1])
            elif event[0] in ("error", "abort"):
                raise _error(event)
            else:
                outcome: Outcome = event[1]
                break
        text = "".join(pieces)
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": outcome.finish_reason,
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": outcome.finish_reason,
            }
        return {
            **self._head(self.kind),
            "choices": [{**choice, **self._extra(outcome)}],
            "usage": outcome.usage,
            "preference": job.generation.preference.to_dict(),
        }

    def _chunk(self, text: str | None, finish: str | None, **extra: Any) -> str:
        if self.chat:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if extra.pop("role", False):
                delta = {"role": "assistant", "content": ""}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            kind = "text_completion"
        return _sse({**self._head(kind), "choices": [{**choice, **extra}]})

    async def stream(self, job: Job) -> AsyncIterator[str]:
        options = self.body.stream_options
        if self.chat:
            yield self._chunk(None, None, role=True)
        while True:
            # A queued event comes without suspending: give the loop a turn between chunks,
            # so that a client gone is heard at once (and other requests are not held up).
            await asyncio.sleep(0)
            event = await job.events.get()
            if event[0] == "text":
                yield self._chunk(event[1], None)
                continue
            if event[0] in ("error", "abort"):  # the status is sent: say it in an event
                yield _sse(_error(event).body())
                break
            outcome: Outcome = event[1]
            yield self._chunk(None, outcome.finish_reason, **self._extra(outcome))
            if options is not None and options.include_usage:
                yield _sse({**self._head(self._stream_kind), "choices": [], "usage": outcome.usage})
            break
        yield "data: [DONE]\n\n"

    @property
    def _stream_kind(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"


def _error(event: tuple) -> RequestError:
    """The error of an ``("error", message)`` event (the model thread failed) or an
    ``("abort", RequestError)`` one (:meth:`Flight.abort`)."""
    if event[0] == "abort":
        return event[1]
    return RequestError(event[1], status=500, kind="server_error")


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
