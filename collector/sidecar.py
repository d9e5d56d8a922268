"""The collector sidecar's life, in the order the durability contract needs: bind, replay, serve, drain, close.

1. **bind** (``Sidecar.bind``): the receiver and its fronts (OTLP/HTTP, OTLP/gRPC) are built and
   their ports bound, so a port in use fails at once, before any file is touched;
2. **replay** (``serve``): the fronts answer (503 with Retry-After while starting) and the receiver
   replays what exited writers left in the spool and seeds its de-duplication window;
3. **serve**: ready once the replay is done; requests are acknowledged once durable;
4. **drain** (``stop``): readiness false, new requests 503, requests in flight answered;
5. **close**: the fronts stop, what is queued is committed and every logged request converted into
   Parquet; what cannot be converted stays in the spool for the next start.

``tracelearn collector serve`` and the tests run the sidecar through this class. grpc is imported
only when the gRPC front is on.

May import: tracelearn.collector (receiver, otlp_http, otlp_grpc, security).
"""

import logging
import ssl
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from tracelearn.collector.http_bodies import DEFAULT_BODY_TIMEOUT_SECONDS
from tracelearn.collector.otlp_http import OtlpHttpServer
from tracelearn.collector.receiver import DEFAULT_MAX_BODY_BYTES, OtlpReceiver, ReceiverConfig, ShutdownReport
from tracelearn.collector.security import TlsFiles

if TYPE_CHECKING:
    from tracelearn.collector.otlp_grpc import OtlpGrpcServer

logger = logging.getLogger(__name__)

# How long shutdown waits for requests in flight (the receiver, then each front).
DRAIN_SECONDS = 20.0
Address = tuple[str, int]


class SidecarStartError(Exception):
    """The sidecar cannot start (a port in use, a bad certificate, grpcio missing); ``str`` says why."""


@dataclass(frozen=True)
class SidecarOptions:
    """What ``tracelearn collector serve`` takes: the receiver's config, the fronts' addresses, access, limits."""

    config: ReceiverConfig
    http: Address | None = ("127.0.0.1", 4318)
    grpc: Address | None = ("127.0.0.1", 4317)
    # Without grpcio, an explicitly asked-for gRPC front is an error; the default one is left off.
    grpc_required: bool = True
    token: bytes | None = None
    tls: TlsFiles | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_SECONDS
    drain_seconds: float = DRAIN_SECONDS


class Sidecar:
    """A bound sidecar: ``serve()`` starts it, ``stop()`` drains and closes it (also as a context manager)."""

    def __init__(
        self,
        options: SidecarOptions,
        receiver: OtlpReceiver,
        http: OtlpHttpServer | None,
        grpc: "OtlpGrpcServer | None",
    ) -> None:
        self.options = options
        self.receiver = receiver
        self.http = http
        self.grpc = grpc
        self._stopped: ShutdownReport | None = None

    @classmethod
    def bind(cls, options: SidecarOptions) -> "Sidecar":
        """Build the receiver and bind the fronts that are on; raises ``SidecarStartError``."""
        if options.http is None and options.grpc is None:
            raise SidecarStartError("both fronts are off: give OTLP/HTTP or OTLP/gRPC an address")
        receiver = OtlpReceiver(options.config, token=options.token)
        http: OtlpHttpServer | None = None
        try:
            if options.http is not None:
                http = OtlpHttpServer(receiver, *options.http, tls=options.tls, max_body_bytes=options.max_body_bytes,
                                      body_timeout_s=options.body_timeout_s)
            grpc = _grpc_front(receiver, options, http is not None)
        except (OSError, ssl.SSLError, SidecarStartError) as error:
            if http is not None:
                http.stop(grace=0)
            receiver.close()
            if isinstance(error, SidecarStartError):
                raise
            raise SidecarStartError(f"cannot start the collector: {error}") from error
        return cls(options, receiver, http, grpc)

    @property
    def url(self) -> str | None:
        """The OTLP/HTTP front's URL (``None`` when it is off)."""
        return self.http.url if self.http is not None else None

    @property
    def port(self) -> int:
        """The OTLP/HTTP front's port."""
        assert self.http is not None, "the OTLP/HTTP front is off"
        return self.http.address[1]

    @property
    def grpc_address(self) -> str | None:
        return self.grpc.address if self.grpc is not None else None

    def serve(self, replay: bool = True) -> None:
        """Start answering, and (``replay``) the start-up replay; ready once it is done (``wait_ready``)."""
        if self.http is not None:
            self.http.start()
        if self.grpc is not None:
            self.grpc.start()
        if replay:
            self.receiver.start()

    def wait_ready(self, timeout: float) -> bool:
        return self.receiver.wait_ready(timeout)

    def stop(self) -> ShutdownReport:
        """Drain, stop the fronts, commit and convert what is queued; returns what the close did."""
        if self._stopped is not None:
            return self._stopped
        grace = self.options.drain_seconds
        logger.info("tracelearn collector: shutting down: draining requests in flight")
        self.receiver.drain(grace)
        if self.http is not None:
            self.http.stop(grace=grace)
        if self.grpc is not None:
            self.grpc.stop(grace=grace)
        self._stopped = self.receiver.close()
        return self._stopped

    def __enter__(self) -> "Sidecar":
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


def _grpc_front(receiver: OtlpReceiver, options: SidecarOptions, http_on: bool) -> "OtlpGrpcServer | None":
    if options.grpc is None:
        return None
    try:
        from tracelearn.collector.otlp_grpc import OtlpGrpcServer
    except ImportError as error:
        if not options.grpc_required and http_on:
            logger.warning(
                "tracelearn collector: OTLP/gRPC is off: grpcio is not installed (%s); "
                "pip install 'tracelearn[collector]'",
                error,
            )
            return None
        raise SidecarStartError(
            f"OTLP/gRPC needs grpcio ({error}): pip install 'tracelearn[collector]', or --grpc '' for HTTP only"
        ) from error
    return OtlpGrpcServer(receiver, *options.grpc, tls=options.tls, max_body_bytes=options.max_body_bytes)
