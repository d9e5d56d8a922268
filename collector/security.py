"""The collector sidecar's access control: the bearer token and TLS, applied by both protocol fronts.

May import: the standard library.
"""

import hmac
import ssl
from dataclasses import dataclass
from pathlib import Path


def bearer_token_matches(expected: bytes | None, authorization: str | None) -> bool:
    """Whether an ``Authorization`` value carries the expected bearer token (always, when none is set).

    Compared in constant time, so the answer's timing does not reveal how much of a guess was right.
    """
    if expected is None:
        return True
    if authorization is None:
        return False
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(credentials.strip().encode("utf-8", "surrogateescape"), expected)


def read_token_file(path: Path) -> bytes:
    """The bearer token in ``path`` (surrounding whitespace removed); raises ``ValueError`` if empty."""
    token = path.read_bytes().strip()
    if not token:
        raise ValueError(f"{path}: the token file is empty")
    return token


@dataclass(frozen=True)
class TlsFiles:
    """A PEM certificate (chain) and its private key."""

    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        return context
