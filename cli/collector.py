"""``tracelearn collector serve|status``: the OTLP receiver sidecar, and a look at a running one.

``serve`` parses its options, runs ``collector.sidecar.Sidecar`` (bind, replay, serve; on SIGTERM or
SIGINT drain and close: every logged request converted into Parquet) and exits 0. grpc is imported
only when the gRPC front is on.
"""

from __future__ import annotations

import json
import logging
import signal
import ssl
import threading
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Any

import click
from click.core import ParameterSource

from tracelearn.collector.dedup import DEFAULT_DEDUP_WINDOW
from tracelearn.collector.http_bodies import DEFAULT_BODY_TIMEOUT_SECONDS
from tracelearn.collector.otlp_validate import DEFAULT_MAX_PARTITIONS
from tracelearn.collector.receiver import DEFAULT_MAX_BODY_BYTES, DEFAULT_QUEUE_BYTES, ReceiverConfig
from tracelearn.collector.security import TlsFiles, read_token_file
from tracelearn.collector.settings import CaptureSettings
from tracelearn.collector.sidecar import DRAIN_SECONDS, Sidecar, SidecarOptions, SidecarStartError
from tracelearn.settings import SettingError

__all__ = ["DRAIN_SECONDS", "collector", "parse_address", "serve", "status"]


def parse_address(text: str, option: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (``[::1]:4318`` for IPv6) as (host, port); ``''`` means the front is off."""
    if not text:
        return None
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        hint = "e.g. 127.0.0.1:4318, or '' to turn it off"
        raise click.BadParameter(f"{text!r} is not HOST:PORT ({hint})", param_hint=option)
    return host, int(port)


@click.group()
def collector() -> None:
    """The OTLP collector sidecar: spans from any language's OpenTelemetry SDK into the Parquet dataset."""


@collector.command("serve")
@click.option("--data", "data_root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Data root; spans land under DATA/spans, feedback under DATA/feedback. [default: $TRACELEARN_DATA "
                   "or ./data]")
@click.option("--http", "http_address", default="127.0.0.1:4318", show_default=True,
              help="HOST:PORT for OTLP/HTTP (/v1/traces, /v1/feedback, /health, /ready, /metrics, /status); '' turns "
                   "it off.")
@click.option("--grpc", "grpc_address", default="127.0.0.1:4317", show_default=True,
              help="HOST:PORT for OTLP/gRPC; '' turns it off.")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="File holding a bearer token every request must carry (Authorization: Bearer <token>); /health and "
                   "/ready stay open.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="PEM certificate (chain) for TLS on both fronts; needs --tls-key.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="PEM private key of --tls-cert.")
@click.option("--max-body-bytes", type=click.IntRange(min=1024), default=DEFAULT_MAX_BODY_BYTES, show_default=True,
              help="Largest request body, compressed and decompressed (413 / RESOURCE_EXHAUSTED above).")
@click.option("--queue-bytes", type=click.IntRange(min=1024), default=DEFAULT_QUEUE_BYTES, show_default=True,
              help="Memory of requests in flight, as read and as decoding will hold them (429 / RESOURCE_EXHAUSTED "
                   "above; 413 for one request that alone needs more).")
@click.option("--body-timeout", type=click.FloatRange(min=0.1), default=DEFAULT_BODY_TIMEOUT_SECONDS,
              show_default=True, help="Seconds an OTLP/HTTP request body may take to arrive, first byte to last (408 "
                                      "beyond).")
@click.option("--dedup-window", type=click.IntRange(min=0), default=DEFAULT_DEDUP_WINDOW, show_default=True,
              help="How many recently written spans are remembered, across restarts, to drop client retries (about "
                   "100 bytes of memory and 24 of disk each).")
@click.option("--max-partitions", type=click.IntRange(min=1), default=DEFAULT_MAX_PARTITIONS, show_default=True,
              help="Distinct (date, service) partitions one request may write; spans beyond are rejected in "
                   "partial_success.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
def serve(
    data_root: Path | None,
    http_address: str,
    grpc_address: str,
    token_file: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    max_body_bytes: int,
    queue_bytes: int,
    body_timeout: float,
    dedup_window: int,
    max_partitions: int,
    log_level: str,
) -> None:
    """Receive OTLP spans over HTTP and gRPC; acknowledge each only once it is on disk, exactly once."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    http_at = parse_address(http_address, "--http")
    grpc_at = parse_address(grpc_address, "--grpc")
    if http_at is None and grpc_at is None:
        raise click.UsageError("both fronts are off: give --http or --grpc an address")
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    try:
        settings = CaptureSettings.from_env()
        token = read_token_file(token_file) if token_file is not None else None
    except (SettingError, ValueError, OSError) as error:
        raise click.ClickException(str(error)) from error
    config = ReceiverConfig.from_settings(
        settings,
        **({"data_root": data_root} if data_root is not None else {}),
        queue_bytes=queue_bytes,
        dedup_window=dedup_window,
        max_partitions=max_partitions,
    )
    options = SidecarOptions(
        config,
        http=http_at,
        grpc=grpc_at,
        # gRPC asked for on the command line must work; the default address is dropped without grpcio.
        grpc_required=click.get_current_context().get_parameter_source("grpc_address") is not ParameterSource.DEFAULT,
        token=token,
        tls=TlsFiles(tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None,
        max_body_bytes=max_body_bytes,
        body_timeout_s=body_timeout,
    )
    try:
        sidecar = Sidecar.bind(options)
    except SidecarStartError as error:
        raise click.ClickException(str(error)) from error

    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        sidecar.serve()
        if sidecar.http is not None:
            click.echo(f"collector: OTLP/HTTP on {sidecar.http.url} (/v1/traces, /v1/feedback, /health, /ready, "
                       "/metrics, /status)")
        if sidecar.grpc is not None:
            click.echo(f"collector: OTLP/gRPC on {sidecar.grpc.address}{' (TLS)' if options.tls else ''}")
        click.echo(f"collector: writing spans to {config.spans_root}, feedback to {config.data_root / 'feedback'}"
                   f"{'; bearer token required' if token else ''}")
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        report = sidecar.stop()
        click.echo(f"collector: shutdown flushed {report.spans_converted} spans into {report.files} Parquet files"
                   + (f"; {report.segments_left} request log segments stay in the spool for the next start"
                      if report.segments_left else ""))


def fetch_status(url: str, token: bytes | None, ca_file: Path | None, timeout: float = 10.0) -> dict[str, Any]:
    """The JSON of a running collector's ``/status``; raises ``click.ClickException`` when unreachable."""
    request = urllib.request.Request(url.rstrip("/") + "/status")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token.decode()}")
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            status: dict[str, Any] = json.loads(response.read())
            return status
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")
        raise click.ClickException(f"{url}/status answered {error.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise click.ClickException(f"cannot reach the collector at {url}: {reason}") from None


def _bytes(count: int | None) -> str:
    if count is None or count < 0:
        return "-"
    if count < 1024:
        return f"{count} B"
    size = float(count)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            break
    return f"{size:.1f} {unit}"


@collector.command("status")
@click.option("--url", default="http://127.0.0.1:4318", show_default=True, help="The collector's OTLP/HTTP address.")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Bearer token file, when the collector requires one.")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CA certificate to verify an https collector (e.g. its self-signed --tls-cert).")
@click.option("--json", "as_json", is_flag=True, help="Print the raw /status JSON.")
def status(url: str, token_file: Path | None, ca_file: Path | None, as_json: bool) -> None:
    """Queue depth, spans accepted / written / rejected, duplicates, files, spool and free disk of a collector."""
    from rich.console import Console
    from rich.table import Table

    try:
        token = read_token_file(token_file) if token_file is not None else None
    except (ValueError, OSError) as error:
        raise click.ClickException(str(error)) from error
    numbers = fetch_status(url, token, ca_file)
    if as_json:
        click.echo(json.dumps(numbers, indent=2))
        return
    rejected = numbers["spans_rejected"]
    table = Table(title=f"collector at {url}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [
        ("ready", "yes" if numbers["ready"] else f"no: {numbers['reason']}"),
        ("queue", f"{_bytes(numbers['queue_bytes'])} of {_bytes(numbers['queue_limit_bytes'])}"),
        ("spans accepted", numbers["spans_accepted"]),
        ("spans written to Parquet", numbers["spans_written"]),
        ("spans awaiting conversion", f"{numbers['spans_awaiting_conversion']} "
                                      f"({_bytes(numbers['conversion_backlog_bytes'])} of sealed requests)"),
        ("spans rejected", ", ".join(f"{reason}: {n}" for reason, n in rejected.items()) or "0"),
        ("duplicates dropped", numbers["spans_duplicate"]),
        ("spans replayed at start", numbers["spans_replayed"]),
        ("quarantine", f"{numbers['quarantine_entries']} entries, {numbers['quarantine_spans']} spans set aside "
                       f"({numbers['spans_quarantined']} since start)"),
        ("files", f"{numbers['spans_files']} in the dataset, {numbers['files_rolled']} rolled since start"),
        ("spool", f"{numbers['spool_segments']} segments, {_bytes(numbers['spool_bytes'])}"),
        ("free disk", _bytes(numbers["disk_free_bytes"])),
        ("feedback items", numbers["feedback_accepted"]),
        ("data", numbers["data"]),
        ("uptime", f"{numbers['uptime_s']:.0f} s"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    Console().print(table)
