"""What every HTTP request of ``align serve`` passes before the API sees it: the shutdown gate
(503), the API key (401) and the body size limit (413), each refusal an OpenAI-style JSON error.

A pure ASGI middleware rather than Starlette's ``BaseHTTPMiddleware``, which would sit between
a streamed answer and its client (and hide the client's disconnect from it).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from starlette.responses import JSONResponse

from align.serve.schema import RequestError

DEFAULT_MAX_BODY_BYTES = 1 << 20

# Past the limit the rest of a body is still read (and dropped) up to this much more: a client
# still sending when the server answers and closes gets a connection reset instead of its 413.
_DRAIN_BYTES = 8 << 20


class Guard:
    """The ASGI middleware: ``closing()`` says whether the server is shutting down; with an
    ``api_key``, ``/v1/...`` needs ``Authorization: Bearer <api_key>`` (``/health`` stays open
    for probes, as vLLM leaves it)."""

    def __init__(
        self,
        app: Any,
        *,
        api_key: str | None,
        max_body_bytes: int,
        closing: Callable[[], bool],
    ):
        if max_body_bytes < 1:
            raise ValueError(f"max body bytes must be >= 1, got {max_body_bytes}")
        self.app = app
        self.key = None if api_key is None else api_key.encode()
        self.max_body_bytes = max_body_bytes
        self.closing = closing

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Read the body first (bounded) whatever the answer, so that a refused request leaves
        # its keep-alive connection clean.
        body, size = await self._read_body(scope, receive)
        if body is None and size < 0:
            return  # the client went away while sending
        error = self._refusal(scope, size)
        if error is not None:
            await JSONResponse(error.body(), status_code=error.status, headers=error.headers)(
                scope, receive, send
            )
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, scope: dict, receive: Callable) -> tuple[bytes | None, int]:
        """``(body, size)``: the body, or None past the limit; size -1 if the client left."""
        declared = _header(scope, b"content-length")
        if declared.isdigit() and int(declared) > self.max_body_bytes + _DRAIN_BYTES:
            return None, int(declared)  # not worth reading: answer at once
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, -1
            piece = message.get("body", b"")
            size += len(piece)
            if size <= self.max_body_bytes:
                chunks.append(piece)
            if not message.get("more_body") or size > self.max_body_bytes + _DRAIN_BYTES:
                break
        return (b"".join(chunks) if size <= self.max_body_bytes else None), size

    def _refusal(self, scope: dict, size: int) -> RequestError | None:
        if self.closing():
            return RequestError(
                "the server is shutting down; send the request to another instance or retry "
                "once it is back",
                status=503,
                kind="server_error",
                code="shutting_down",
                headers={"Connection": "close"},
            )
        if self.key is not None and scope["path"].startswith("/v1") and not self._authorized(scope):
            return RequestError(
                "missing or incorrect API key: send the header `Authorization: Bearer <key>` "
                "with the key the server was started with (--api-key or ALIGN_API_KEY)",
                status=401,
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if size > self.max_body_bytes:
            return RequestError(
                f"the request body is larger than this server's limit of "
                f"{self.max_body_bytes} bytes (--max-body-bytes)",
                status=413,
                code="request_too_large",
                headers={"Connection": "close"},
            )
        return None

    def _authorized(self, scope: dict) -> bool:
        scheme, _, token = _header(scope, b"authorization").partition(" ")
        # compare_digest: the time taken does not tell how much of a guessed key was right.
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key)


def _header(scope: dict, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return ""


def _replay(body: bytes, receive: Callable) -> Callable:
    """The app's ``receive``: the body already read, then the client's own messages (so that
    the app still hears its disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> dict:
        return pending.pop() if pending else await receive()

    return replayed
