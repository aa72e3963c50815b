"""``align serve``: an OpenAI-compatible HTTP server for preference-guided decoding.

A frozen base guided by a PARM, GenARM ARMs or MOD policies — or a preference-adapter policy
on its own — built from the same route specs as ``align evaluate`` (:mod:`align.serve.served`),
decoding every request in flight in one batch, each row at its own α, rows joining and
leaving between steps (:mod:`align.serve.scheduler`, over
:class:`align.decoding.batch.DecodingBatch`). FastAPI and uvicorn come with the ``serve``
extra.
"""

from __future__ import annotations

from typing import Any

from align.serve.served import ServedModel


def create_app(served: ServedModel, max_batch: int = 16) -> Any:
    """The FastAPI app serving ``served`` (see :mod:`align.serve.app`)."""
    from align.serve.app import create_app as _create_app

    return _create_app(served, max_batch=max_batch)


def serve(
    served: ServedModel,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 16,
    **uvicorn_options: Any,
) -> None:
    """Serve until interrupted (uvicorn; the model decodes in one worker thread)."""
    import uvicorn

    uvicorn.run(create_app(served, max_batch), host=host, port=port, **uvicorn_options)


__all__ = ["ServedModel", "create_app", "serve"]
