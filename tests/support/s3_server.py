"""A local S3-compatible endpoint (moto's server over real HTTP) for the object-storage tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow.fs as pafs
import pytest
from moto.server import ThreadedMotoServer


@contextmanager
def s3_bucket(monkeypatch: pytest.MonkeyPatch, bucket: str) -> Iterator[pafs.S3FileSystem]:
    """Start the endpoint, point the standard AWS variables at it (pyarrow and polars read them), make ``bucket``."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ALLOW_HTTP": "true",
    }.items():
        monkeypatch.setenv(name, value)
    filesystem = pafs.S3FileSystem(endpoint_override=f"http://{host}:{port}", allow_bucket_creation=True)
    filesystem.create_dir(bucket)
    try:
        yield filesystem
    finally:
        server.stop()
