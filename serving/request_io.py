"""A request's side of the HTTP exchange: its body read under a size limit, and noticing that its
client has gone, so the work done for it can stop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from tracelearn.serving.protocol import APIError

T = TypeVar("T")


async def read_body(http: Request, limit: int) -> bytes:
    """The request body; ``APIError`` 413 as soon as it is known to exceed ``limit`` bytes (from the
    declared ``Content-Length`` before reading anything, or while reading a chunked body)."""
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> APIError:
    return APIError(f"The request body is larger than this server's limit of {limit} bytes", status_code=413,
                    code="request_too_large")


async def unless_disconnected(http: Request, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None when the client disconnects first: ``work`` is then cancelled, which
    cancels its engine requests at their next step (uvicorn does not cancel a handler whose client
    left; only a streaming response notices, by itself)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(http))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        return task.result() if task.done() else None
    finally:
        gone.cancel()
        task.cancel()


async def _disconnected(http: Request) -> None:
    """Returns when the client has gone (the body was read already, so nothing else is received)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
