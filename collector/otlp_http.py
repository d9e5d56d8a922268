"""OTLP/HTTP front of the collector sidecar, on the standard library's threaded HTTP/1.1 server.

Owns the HTTP protocol only: dispatch, the bearer token (401), TLS, and turning the receiver's results
and refusals into OTLP/HTTP answers; reading bodies within their limits is ``http_bodies``'s:

- ``POST /v1/traces`` (``application/x-protobuf`` or ``application/json``): 200 with an
  ``ExportTraceServiceResponse`` in the request's encoding (``partial_success`` when spans were
  rejected, dropped or truncated); 400 malformed, 413 too large, 415 unsupported type or encoding,
  408 body not received within the body deadline, 429 queue full, 503 starting / draining / disk
  refusing, both with ``Retry-After``. Error bodies are
  a ``google.rpc.Status`` in the request's encoding (JSON when it had none we speak).
- ``POST /v1/feedback``: a JSON object or list of objects, whatever the ``Content-Type`` (so that
  ``curl -d`` works); 200 ``{"accepted": n}`` once durable; 400 names each bad item and field.
- ``GET /health`` (liveness, always 200), ``GET /ready`` (200, or 503 with the reason),
  ``GET /metrics`` (Prometheus text), ``GET /status`` (JSON for ``tracelearn collector status``).
  ``/health`` and ``/ready`` are open for probes; everything else needs the token when one is set.

Why the standard library server: one request carries hundreds of spans, so its HTTP cost (~0.1 ms
to parse a request) is a few per cent of decoding them; keep-alive connections each get a thread,
which blocks in I/O or in the group commit with the GIL released. It adds no dependency.
Memory: a request body counts in the receiver's byte-bounded write queue as its bytes arrive (not
as its ``Content-Length`` announces: a client that announces 16 MiB and sends a byte a minute holds a
byte), so many connections at once cannot hold more than the queue's bound (429 beyond); a body must
arrive whole within ``body_timeout_s`` of its first byte (408 and the connection closed otherwise),
so idle uploads cannot keep even their few bytes, or a thread, for long.

Nothing received is evaluated: bodies go to the protobuf parser or orjson.

May import: tracelearn.collector (receiver, backpressure, http_bodies, security, otlp_decode), the
standard library, protobuf messages.
"""

import contextlib
import http.server
import logging
import math
import socket
import ssl
import sys
import threading
from typing import Any

import orjson
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from tracelearn.collector.backpressure import RequestTooLargeError, Reservation, RetryLaterError
from tracelearn.collector.http_bodies import (
    DEFAULT_BODY_TIMEOUT_SECONDS,
    IDLE_TIMEOUT_SECONDS,
    HttpError,
    RequestBody,
    linger,
    refusal_answer,
)
from tracelearn.collector.otlp_decode import JSON_CONTENT_TYPE, PROTOBUF_CONTENT_TYPE, OtlpDecodeError
from tracelearn.collector.otlp_wire import Body
from tracelearn.collector.receiver import DEFAULT_MAX_BODY_BYTES, ExportOutcome, InvalidFeedbackError, OtlpReceiver
from tracelearn.collector.security import TlsFiles, bearer_token_matches

logger = logging.getLogger(__name__)

TRACES_PATH = "/v1/traces"
FEEDBACK_PATH = "/v1/feedback"
GET_PATHS = frozenset({"/health", "/ready", "/metrics", "/status"})
OPEN_PATHS = frozenset({"/health", "/ready"})
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# google.rpc.Code for each HTTP status we answer with (the Status body's ``code``).
RPC_CODES = {400: 3, 401: 16, 404: 5, 405: 12, 408: 4, 411: 3, 413: 8, 415: 3, 429: 8, 500: 13, 503: 14}
EMPTY_RESPONSE = bytes(ExportTraceServiceResponse().SerializeToString())


class _Server(http.server.ThreadingHTTPServer):
    """One thread per connection; knows which connections are mid-request so stop can wait for them."""

    daemon_threads = True
    block_on_close = False  # stop() waits for busy requests only, not for idle keep-alive connections
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], front: "OtlpHttpServer") -> None:
        self.front = front
        self.connections: set[socket.socket] = set()
        self.busy = 0
        self.idle = threading.Condition()
        super().__init__(address, _OtlpHandler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        connection = request
        context = self.front.tls_context
        if context is not None:
            request.settimeout(IDLE_TIMEOUT_SECONDS)
            try:
                # The handshake runs on this connection's thread, so a slow client never holds up accept().
                connection = context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                logger.debug("tracelearn collector: TLS handshake with %s failed: %s", client_address, exc)
                request.close()
                return
        with self.idle:
            self.connections.add(connection)
        try:
            handler = _OtlpHandler(connection, client_address, self)
            if handler.body is not None and not handler.body.consumed:
                linger(connection)
        finally:
            with self.idle:
                self.connections.discard(connection)
            if connection is not request:
                connection.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # a client that reset or timed out between requests
            logger.debug("tracelearn collector: connection from %s ended: %s", client_address, error)
        else:
            logger.exception("tracelearn collector: a connection from %s failed", client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _OtlpHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_SECONDS
    disable_nagle_algorithm = True  # the answer is two writes (headers, body): send each at once
    server: _Server
    # The current request's body (``None`` before the first request).
    body: RequestBody | None = None

    def version_string(self) -> str:
        return "tracelearn-collector"

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("tracelearn collector: %s " + format, self.address_string(), *args)

    # --- dispatch

    def do_GET(self) -> None:
        self._answer(self._get)

    def do_POST(self) -> None:
        self._answer(self._post)

    def _answer(self, handler: Any) -> None:
        front = self.server.front
        self.body = RequestBody(self.rfile, self.connection, self.headers, front.max_body_bytes,
                                front.receiver.queue.limit, front.body_timeout_s)
        path = self.path.split("?", 1)[0]
        self._path_label = path if path in GET_PATHS or path in (TRACES_PATH, FEEDBACK_PATH) else "other"
        self._status_encoding = JSON_CONTENT_TYPE
        with self.server.idle:
            self.server.busy += 1
        try:
            self._dispatch(handler, path)
        except (TimeoutError, ConnectionError):
            self.close_connection = True  # the client stalled or went away: nobody to answer
            self.body.consumed = True  # nor to linger for
        finally:
            with self.server.idle:
                self.server.busy -= 1
                self.server.idle.notify_all()

    def _dispatch(self, handler: Any, path: str) -> None:
        try:
            handler(path)
        except (TimeoutError, ConnectionError):
            raise
        except HttpError as error:
            if error.close or self._current_body().close:
                self.close_connection = True
            self.server.front.receiver.warnings.warn(
                f"http {error.status}",
                f"answered {error.status} to {self.command} {path} from {self.address_string()}: {error}",
            )
            self._send_status(error.status, str(error), error.retry_after)
        except Exception:
            logger.exception("tracelearn collector: %s %s failed", self.command, path)
            self.close_connection = True
            self._send_status(500, "internal error; see the collector's log")

    def _get(self, path: str) -> None:
        if path not in GET_PATHS:
            raise HttpError(404, f"no such endpoint {path}; POST {TRACES_PATH} or {FEEDBACK_PATH}")
        self._discard_body()
        receiver = self.server.front.receiver
        if path == "/health":
            self._send(200, b'{"status": "ok"}', JSON_CONTENT_TYPE)
        elif path == "/ready":
            ready, reason = receiver.ready
            self._send(200 if ready else 503, orjson.dumps({"ready": ready, "reason": reason}), JSON_CONTENT_TYPE)
        else:
            self._check_token()
            if path == "/metrics":
                self._send(200, receiver.metrics_text().encode(), METRICS_CONTENT_TYPE)
            else:
                self._send(200, orjson.dumps(receiver.status()), JSON_CONTENT_TYPE)

    def _post(self, path: str) -> None:
        receiver = self.server.front.receiver
        if path == TRACES_PATH:
            content_type = self.headers.get("Content-Type", "")
            media_type = content_type.split(";", 1)[0].strip().lower()
            if media_type in (PROTOBUF_CONTENT_TYPE, JSON_CONTENT_TYPE):
                self._status_encoding = media_type
            self._check_token()
            if media_type not in (PROTOBUF_CONTENT_TYPE, JSON_CONTENT_TYPE):
                self._refuse_body(
                    HttpError(415, f"Content-Type {content_type!r}: use {PROTOBUF_CONTENT_TYPE} or {JSON_CONTENT_TYPE}")
                )
            self._admit()
            # The body counts in the write queue as its bytes arrive, so the memory of bodies being
            # read on many connections at once is bounded too (429 when they do not fit).
            with receiver.reserve() as reservation:
                body = self._read_body(reservation)
                try:
                    outcome = receiver.export_traces(body, media_type, reservation)
                except OtlpDecodeError as exc:
                    raise HttpError(400, str(exc)) from None
                except RequestTooLargeError as exc:
                    raise HttpError(413, str(exc)) from None
                except RetryLaterError as refusal:
                    raise refusal_answer(refusal) from None
            self._send(200, _export_response(outcome, media_type), media_type)
        elif path == FEEDBACK_PATH:
            self._check_token()
            self._admit()
            with receiver.reserve() as reservation:
                body = self._read_body(reservation)
                try:
                    accepted = receiver.export_feedback(body, reservation)
                except InvalidFeedbackError as exc:
                    receiver.warnings.warn("feedback 400", f"answered 400 to feedback from {self.address_string()}: "
                                                           f"{exc}")
                    payload = {"code": RPC_CODES[400], "message": str(exc), "errors": exc.errors}
                    self._send(400, orjson.dumps(payload), JSON_CONTENT_TYPE)
                    return
                except RequestTooLargeError as exc:
                    raise HttpError(413, str(exc)) from None
                except RetryLaterError as refusal:
                    raise refusal_answer(refusal) from None
            self._send(200, orjson.dumps({"accepted": accepted}), JSON_CONTENT_TYPE)
        elif path in GET_PATHS:
            self._refuse_body(HttpError(405, f"{path} answers GET"))
        else:
            self._refuse_body(HttpError(404, f"no such endpoint {path}; POST {TRACES_PATH} or {FEEDBACK_PATH}"))

    # --- checks

    def _check_token(self) -> None:
        if not bearer_token_matches(self.server.front.token, self.headers.get("Authorization")):
            self._refuse_body(HttpError(401, "missing or wrong bearer token (Authorization: Bearer <token>)"))

    def _admit(self) -> None:
        """Refuse before reading the body when the receiver would refuse anyway (cheap under overload)."""
        try:
            self.server.front.receiver.check_accepting()
        except RetryLaterError as refusal:
            self._refuse_body(refusal_answer(refusal))

    # --- bodies

    def _current_body(self) -> RequestBody:
        assert self.body is not None, "set for every request in _answer"
        return self.body

    def _refuse_body(self, error: HttpError) -> None:
        self._current_body().refuse(error)

    def _discard_body(self) -> None:
        body = self._current_body()
        body.discard()
        if body.close:
            self.close_connection = True

    def _read_body(self, reservation: Reservation) -> Body:
        return self._current_body().read(reservation)

    # --- answers

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.server.front.receiver.count_request("http", self._path_label, str(status))

    def _send_status(self, status: int, message: str, retry_after: float | None = None) -> None:
        """An error answer: a ``google.rpc.Status`` in the request's encoding."""
        headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else {}
        if status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="tracelearn-collector"'
        code = RPC_CODES.get(status, 2)
        if self._status_encoding == PROTOBUF_CONTENT_TYPE:
            body = bytes(status_pb2.Status(code=code, message=message).SerializeToString())
        else:
            body = orjson.dumps({"code": code, "message": message})
        self._send(status, body, self._status_encoding, headers)


def _export_response(outcome: ExportOutcome, media_type: str) -> bytes:
    if not outcome.rejected and not outcome.error_message:
        return EMPTY_RESPONSE if media_type == PROTOBUF_CONTENT_TYPE else b"{}"
    if media_type == PROTOBUF_CONTENT_TYPE:
        response = ExportTraceServiceResponse()
        response.partial_success.rejected_spans = outcome.rejected
        response.partial_success.error_message = outcome.error_message
        return bytes(response.SerializeToString())
    # Proto3 JSON: int64 as a string.
    partial = {"rejectedSpans": str(outcome.rejected), "errorMessage": outcome.error_message}
    return orjson.dumps({"partialSuccess": partial})


class OtlpHttpServer:
    """The OTLP/HTTP endpoint on ``host:port`` (port 0: any free port), served on a background thread."""

    def __init__(
        self,
        receiver: OtlpReceiver,
        host: str = "127.0.0.1",
        port: int = 4318,
        tls: TlsFiles | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_SECONDS,
    ) -> None:
        self.receiver = receiver
        self.token = receiver.token
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.tls_context = tls.server_context() if tls is not None else None
        server_class = _Server6 if ":" in host else _Server
        self._server = server_class((host, port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="tracelearn-otlp-http", daemon=True
        )

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        scheme = "https" if self.tls_context is not None else "http"
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self, grace: float = 10.0) -> None:
        """Stop accepting connections, let requests being answered finish (up to ``grace`` s), close the rest."""
        if self._thread.ident is not None:  # shutdown() waits for serve_forever: forever, if it never ran
            self._server.shutdown()
        self._server.server_close()
        with self._server.idle:
            self._server.idle.wait_for(lambda: self._server.busy == 0, grace)
            connections = list(self._server.connections)
        for connection in connections:  # idle keep-alive connections: their threads end on EOF
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
