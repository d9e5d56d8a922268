"""The gateway's upstream: its base URL, the headers passed each way, and its failures as OpenAI errors.

Hop-by-hop headers (and those the proxy recomputes) are never forwarded; an upstream that cannot be
reached or times out is ``UpstreamError`` (answered 502 / 504 with an OpenAI error body naming it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
from fastapi.responses import JSONResponse

from tracelearn.serving.gateway_prompts import GatewayConfigError

REJECTION_STATUSES: Final = frozenset({400, 422})
# Hop-by-hop headers (RFC 9110 7.6.1) and those the proxy recomputes; never forwarded either way.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


def normalize_upstream(url: str) -> str:
    """The upstream's OpenAI base URL: ``http://host:8000`` becomes ``http://host:8000/v1``."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise GatewayConfigError(f"upstream {url!r} is not an http(s) URL; give e.g. http://127.0.0.1:8000/v1")
    base = url.strip().rstrip("/")
    return base if parts.path.strip("/") else base + "/v1"


def error_body(message: str, error_type: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}}


def forwarded_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {name: value for name, value in headers if name.lower() not in HOP_BY_HOP}


def response_headers(headers: httpx.Headers, decoded: bool) -> dict[str, str]:
    """Upstream response headers for the client; ``decoded``: the body was decompressed by httpx."""
    kept = {}
    for name, value in headers.multi_items():
        lower = name.lower()
        if lower in HOP_BY_HOP or (decoded and lower == "content-encoding"):
            continue
        kept[name] = value
    return kept


def rejected_fields(status: int, text: str, injected: Sequence[str]) -> list[str]:
    """The fields we added that an error response refuses (empty: the error is the client's own)."""
    if status not in REJECTION_STATUSES:
        return []
    return [name for name in injected if name in text]


class UpstreamError(Exception):
    """The upstream could not be reached or timed out (answered as 502 / 504)."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, "upstream_error", self.code), status_code=self.status)
