"""The OpenAI-compatible HTTP API of ``align serve`` (FastAPI).

``POST /v1/chat/completions`` and ``POST /v1/completions`` (server-sent events when ``stream``
is true: OpenAI's chunks, then ``data: [DONE]``), ``GET /v1/models`` (the model card lists the
objectives), ``GET /health``. Every request may carry its own ``preference`` (α); a bad
request is a 4xx whose JSON body says what is wrong (OpenAI's ``{"error": {...}}`` shape).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from align.serve.scheduler import Job, Outcome, Scheduler
from align.serve.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    parse_body,
    to_generation,
)


def create_app(served: Any, max_batch: int = 16) -> FastAPI:
    """The app serving ``served`` (a :class:`~align.serve.served.ServedModel`); its model
    thread starts and stops with the app (the ASGI lifespan)."""
    scheduler = Scheduler(served, max_batch=max_batch)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="align serve", lifespan=lifespan)
    app.state.served, app.state.scheduler = served, scheduler
    created = int(time.time())

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

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

    def submit(generation: Any) -> Job:
        if not scheduler.alive:
            raise RequestError(
                "the model worker is not running; restart the server",
                status=503,
                kind="server_error",
            )
        return scheduler.submit(generation)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the model's worker thread runs (503 if it died), with what the batching
        did so far."""
        alive = scheduler.alive
        body = {
            "status": "ok" if alive else "error: the model worker is not running",
            "model": served.name,
            "max_batch": scheduler.max_batch,
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
        job = submit(generation)
        reply = _Reply("chat.completion", "chatcmpl", served.name, body)
        if body.stream:
            return _event_stream(reply.stream(job))
        return JSONResponse(await reply.whole(job))

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
        job = submit(generation)
        reply = _Reply("text_completion", "cmpl", served.name, body)
        if body.stream:
            return _event_stream(reply.stream(job))
        return JSONResponse(await reply.whole(job))

    return app


def _event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


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
        try:
            while True:
                event = await job.events.get()
                if event[0] == "text":
                    pieces.append(event[1])
                elif event[0] == "error":
                    raise RequestError(event[1], status=500, kind="server_error")
                else:
                    outcome: Outcome = event[1]
                    break
        finally:
            job.cancel()  # a no-op once finished; else (the client went away) the row leaves
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
        try:
            if self.chat:
                yield self._chunk(None, None, role=True)
            while True:
                event = await job.events.get()
                if event[0] == "text":
                    yield self._chunk(event[1], None)
                    continue
                if event[0] == "error":
                    yield _sse(RequestError(event[1], status=500, kind="server_error").body())
                    break
                outcome: Outcome = event[1]
                yield self._chunk(None, outcome.finish_reason, **self._extra(outcome))
                if options is not None and options.include_usage:
                    yield _sse(
                        {**self._head(self._stream_kind), "choices": [], "usage": outcome.usage}
                    )
                break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()

    @property
    def _stream_kind(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
