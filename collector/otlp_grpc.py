"""OTLP/gRPC front of the collector sidecar: ``opentelemetry.proto.collector.trace.v1.TraceService/Export``.

Owns the gRPC protocol only; the receiver does the work. The method is registered as a generic
handler that takes and returns raw bytes, so the request is parsed once, by ``otlp_decode``, not
first into a Python message by grpc. grpc itself enforces the message size (``max_body_bytes``, also
after gzip decompression) and the number of concurrent calls.

Answers: OK with an ``ExportTraceServiceResponse`` (``partial_success`` as over HTTP);
INVALID_ARGUMENT for a malformed request; UNAUTHENTICATED without the bearer token (metadata
``authorization: Bearer <token>``); RESOURCE_EXHAUSTED without retry information for a request that
alone needs more memory than the write queue holds; RESOURCE_EXHAUSTED (queue full) and UNAVAILABLE (starting,
draining, disk refusing) with retry information in the trailing metadata in both forms clients
read: ``google.rpc.retryinfo-bin`` (a ``RetryInfo``, what opentelemetry-exporter-otlp-proto-grpc
honours) and ``grpc-status-details-bin`` (a ``google.rpc.Status`` whose details hold the
``RetryInfo``, what the Go and Java exporters read).

May import: tracelearn.collector (receiver, backpressure, security, otlp_decode), grpc, protobuf messages.
"""

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from google.protobuf.any_pb2 import Any as AnyMessage
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from tracelearn.collector.backpressure import QueueFullError, RequestTooLargeError, RetryLaterError
from tracelearn.collector.otlp_decode import PROTOBUF_CONTENT_TYPE, OtlpDecodeError
from tracelearn.collector.receiver import DEFAULT_MAX_BODY_BYTES, ExportOutcome, OtlpReceiver
from tracelearn.collector.security import TlsFiles, bearer_token_matches

logger = logging.getLogger(__name__)

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
METHOD_PATH = f"/{SERVICE}/Export"
# Calls served at once (each blocks in the group commit with the GIL released) and admitted at once
# (beyond that grpc answers RESOURCE_EXHAUSTED by itself); each holds at most max_body_bytes.
MAX_WORKERS = 16
MAX_CONCURRENT_RPCS = 64
EMPTY_RESPONSE = bytes(ExportTraceServiceResponse().SerializeToString())


def retry_metadata(code: grpc.StatusCode, message: str, retry_after: float) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata telling OTLP clients to retry after ``retry_after`` seconds."""
    retry = error_details_pb2.RetryInfo()
    retry.retry_delay.seconds = int(retry_after)
    retry.retry_delay.nanos = int((retry_after - int(retry_after)) * 1e9)
    detail = AnyMessage()
    detail.Pack(retry)
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    return (
        ("grpc-status-details-bin", bytes(status.SerializeToString())),
        ("google.rpc.retryinfo-bin", bytes(retry.SerializeToString())),
    )


def _response(outcome: ExportOutcome) -> bytes:
    if not outcome.rejected and not outcome.error_message:
        return EMPTY_RESPONSE
    response = ExportTraceServiceResponse()
    response.partial_success.rejected_spans = outcome.rejected
    response.partial_success.error_message = outcome.error_message
    return bytes(response.SerializeToString())


class OtlpGrpcServer:
    """The OTLP/gRPC endpoint on ``host:port`` (port 0: any free port)."""

    def __init__(
        self,
        receiver: OtlpReceiver,
        host: str = "127.0.0.1",
        port: int = 4317,
        tls: TlsFiles | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.receiver = receiver
        self.tls = tls
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            # No (de)serializers: the method gets the request's bytes and returns the response's.
            {"Export": grpc.unary_unary_rpc_method_handler(self._export)},
        )
        self._server = grpc.server(
            ThreadPoolExecutor(MAX_WORKERS, thread_name_prefix="tracelearn-otlp-grpc"),
            handlers=[handler],
            options=[("grpc.max_receive_message_length", max_body_bytes), ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        )
        self.host = host
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            if tls is None:
                self.port = self._server.add_insecure_port(address)
            else:
                credentials = grpc.ssl_server_credentials([(tls.key.read_bytes(), tls.cert.read_bytes())])
                self.port = self._server.add_secure_port(address, credentials)
        except RuntimeError as exc:  # grpc's way of saying the address cannot be bound
            raise OSError(f"cannot listen on {address} for OTLP/gRPC: {exc}") from None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def start(self) -> None:
        self._server.start()

    def stop(self, grace: float = 10.0) -> None:
        """Refuse new calls at once; calls in progress get up to ``grace`` seconds to finish."""
        self._server.stop(grace).wait()

    def _export(self, request: bytes, context: Any) -> bytes:
        code, payload, retry_after = self._answer(request, context)
        self.receiver.count_request("grpc", METHOD_PATH, code.name)
        if isinstance(payload, bytes):
            return payload
        message = payload
        self.receiver.warnings.warn(f"grpc {code.name}", f"answered {code.name} to {context.peer()}: {message}")
        if retry_after is not None:
            context.set_trailing_metadata(retry_metadata(code, message, retry_after))
        context.abort(code, message)
        raise AssertionError("context.abort raises")

    def _answer(self, request: bytes, context: Any) -> tuple[grpc.StatusCode, bytes | str, float | None]:
        """(status code, the response's bytes or the error message, retry-after seconds for retryable errors)."""
        metadata = {key: value for key, value in context.invocation_metadata() if isinstance(value, str)}
        if not bearer_token_matches(self.receiver.token, metadata.get("authorization")):
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong bearer token (authorization: Bearer <token>)",
                None,
            )
        try:
            outcome = self.receiver.export_traces(request, PROTOBUF_CONTENT_TYPE)
        except OtlpDecodeError as exc:
            return grpc.StatusCode.INVALID_ARGUMENT, str(exc), None
        except RequestTooLargeError as exc:  # no retry information: a retry would fail the same way
            return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), None
        except RetryLaterError as refusal:
            exhausted = isinstance(refusal, QueueFullError)
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if exhausted else grpc.StatusCode.UNAVAILABLE
            return code, str(refusal), refusal.retry_after
        except Exception:
            logger.exception("tracelearn collector: an OTLP/gRPC export failed")
            return grpc.StatusCode.INTERNAL, "internal error; see the collector's log", None
        return grpc.StatusCode.OK, _response(outcome), None
