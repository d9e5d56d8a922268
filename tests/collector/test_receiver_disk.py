"""A disk that refuses writes: the sidecar answers 503 with Retry-After, is not ready, keeps what it
acknowledged, and accepts again once writes work, with nothing acknowledged lost or duplicated."""

import contextlib
import errno
import json
import resource
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.otlp_sidecar import get, otlp_body, post, running_sidecar, sdk_spans, span_key, span_keys, wait_for
from support.otlp_sidecar import start_sidecar_process as start_process

TRACES = "/v1/traces"


@contextlib.contextmanager
def small_filesystem(path: Path, size: str = "8m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (skips the test where mounting is not permitted)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem is full; returns it (delete it to give the space back)."""
    filler = directory / f"filler-{uuid.uuid4().hex}"
    block = bytes(1 << 16)
    with filler.open("wb", buffering=0) as handle:
        while True:
            try:
                handle.write(block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
    return filler


def test_a_full_disk_is_refused_with_503_and_writes_resume_when_space_returns(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "disk") as disk:
        acknowledged: list[tuple[str, str]] = []
        with running_sidecar(disk / "data") as sidecar:
            for _ in range(3):
                spans = sdk_spans(10)
                assert post(sidecar.port, TRACES, otlp_body(spans))[0] == 200
                acknowledged += map(span_key, spans)

            filler = fill(disk)
            status, headers, answer = post(sidecar.port, TRACES, otlp_body(sdk_spans(10)))
            assert status == 503 and int(headers["retry-after"]) >= 1
            assert b"No space left on device" in answer
            ready, reason = get(sidecar.url, "/ready")
            assert ready == 503 and b"disk refuses writes" in reason
            assert post(sidecar.port, TRACES, otlp_body(sdk_spans(2)))[0] == 503, "refused up front while full"
            feedback = b'{"rollout_id": "r", "name": "n", "value": 1}'
            assert post(sidecar.port, "/v1/feedback", feedback)[0] == 503

            filler.unlink()
            wait_for(lambda: get(sidecar.url, "/ready")[0] == 200, 15, "readiness once space returns")
            spans = sdk_spans(10)
            assert post(sidecar.port, TRACES, otlp_body(spans))[0] == 200
            acknowledged += map(span_key, spans)
            status_json = json.loads(get(sidecar.url, "/status")[1])
        assert status_json["write_failures"] >= 1 and status_json["spans_rejected"]["unavailable"] == 10
        assert sorted(span_keys(disk / "data")) == sorted(acknowledged)


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="resource.prlimit is Linux-only")
def test_a_file_size_limit_makes_the_process_refuse_then_resume_without_losing_anything(tmp_path: Path) -> None:
    """No root needed: RLIMIT_FSIZE set on the running collector makes its writes fail with EFBIG."""
    data = tmp_path / "data"
    sidecar = start_process(data)
    pid = sidecar.process.pid
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    acknowledged: list[tuple[str, str]] = []
    try:
        for _ in range(6):
            spans = sdk_spans(10)
            assert post(sidecar.port, TRACES, otlp_body(spans))[0] == 200
            acknowledged += map(span_key, spans)
        segment = next((data / "spans" / "_spool").glob("requests-*.otlp"))
        limit = segment.stat().st_size // 2
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))  # the request log cannot grow
        status, headers, answer = post(sidecar.port, TRACES, otlp_body(sdk_spans(10)))
        assert status == 503 and headers["retry-after"] == "5" and b"File too large" in answer
        assert get(sidecar.url, "/ready")[0] == 503

        resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard, hard))
        wait_for(lambda: get(sidecar.url, "/ready")[0] == 200, 15, "readiness once writes work")
        spans = sdk_spans(10)
        assert post(sidecar.port, TRACES, otlp_body(spans))[0] == 200
        acknowledged += map(span_key, spans)
    finally:
        output = sidecar.stop(signal.SIGTERM)
    assert sidecar.process.returncode == 0, output
    assert "refusing spans (503" in output and "writes work again" in output
    assert sorted(span_keys(data)) == sorted(acknowledged)
