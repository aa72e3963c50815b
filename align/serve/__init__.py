"""``align serve``: an OpenAI-compatible HTTP server for preference-guided decoding.

A frozen base guided by a PARM, GenARM ARMs or MOD policies — or a preference-adapter policy
on its own — built from the same route specs as ``align evaluate`` (:mod:`align.serve.served`),
decoding every request in flight in one batch, each row at its own α, rows joining and
leaving between steps (:mod:`align.serve.scheduler`, over
:class:`align.decoding.batch.DecodingBatch`). FastAPI and uvicorn come with the ``serve``
extra.
"""

from __future__ import annotations

import ipaddress
import sys
from typing import Any

from align.serve.served import ServedModel


def create_app(served: ServedModel, max_batch: int = 16, **limits: Any) -> Any:
    """The FastAPI app serving ``served`` (see :mod:`align.serve.app`; ``limits``: api_key,
    max_queue, max_body_bytes, request_timeout)."""
    from align.serve.app import create_app as _create_app

    return _create_app(served, max_batch=max_batch, **limits)


def serve(
    served: ServedModel,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 16,
    *,
    api_key: str | None = None,
    max_queue: int | None = None,
    max_body_bytes: int | None = None,
    request_timeout: float | None = None,
    shutdown_timeout: float = 10.0,
    **uvicorn_options: Any,
) -> None:
    """Serve until SIGTERM or Ctrl-C (uvicorn; the model decodes in one worker thread), then
    drain for at most ``shutdown_timeout`` seconds and return."""
    import uvicorn

    from align.serve.app import GracefulServer

    if api_key is None and not is_loopback(host):
        print(
            f"warning: listening on {host} without an API key: anyone who can reach port "
            f"{port} can use the model (set --api-key or ALIGN_API_KEY)",
            file=sys.stderr,
        )
    limits = {"max_queue": max_queue, "max_body_bytes": max_body_bytes}
    app = create_app(
        served,
        max_batch,
        api_key=api_key,
        request_timeout=request_timeout,
        **{k: v for k, v in limits.items() if v is not None},
    )
    # The drain has already run when uvicorn stops: what is left gets a second at most.
    config = uvicorn.Config(
        app, host=host, port=port, timeout_graceful_shutdown=1, **uvicorn_options
    )
    GracefulServer(config, app.state.flight, shutdown_timeout).run()


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


__all__ = ["ServedModel", "create_app", "is_loopback", "serve"]
