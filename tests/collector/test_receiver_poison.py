"""No poison pill (issue 18): one bad span, partition or spool segment never stops the collector, never fails
other spans, never loses an acknowledged span. Each test sends the attack over a real socket to a real
collector (``tracelearn collector serve`` as a process where a restart or the disk is involved)."""

import datetime as dt
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from support.otlp_sidecar import (
    get,
    otlp_body,
    post,
    running_sidecar,
    sdk_spans,
    span_key,
    span_keys,
    spans_table,
    start_sidecar_process,
    wait_for,
)

from tracelearn.collector.quarantine import QUARANTINE_DIR, REASON_SUFFIX
from tracelearn.collector.request_log import LoggedRequest, RequestLog, log_file_name
from tracelearn.collector.spool import SPOOL_DIR, SegmentName
from tracelearn.schemas.dataset import dataset_files
from tracelearn.storage.atomic_files import local_host, path_segment_safe

TRACES = "/v1/traces"
JSON = {"Content-Type": "application/json"}
FAST_ROLLS = {"TRACELEARN_ROLL_SECONDS": "1"}


def status_of(url: str) -> dict[str, object]:
    return json.loads(get(url, "/status")[1])


def converted(url: str) -> bool:
    status = status_of(url)
    return status["spans_awaiting_conversion"] == 0 and status["conversion_backlog_bytes"] == 0


def quarantine_reasons(data: Path) -> list[dict[str, object]]:
    directory = data / "spans" / QUARANTINE_DIR
    return [json.loads(path.read_text()) for path in sorted(directory.glob(f"*{REASON_SUFFIX}"))]


def test_long_and_non_ascii_service_names_get_directories_of_their_own_and_intake_goes_on(tmp_path: Path) -> None:
    """A 300-character ``service.name`` once broke the roll (ENAMETOOLONG) and turned the collector into a 503 wall."""
    data = tmp_path / "data"
    names = ["a" * 300, "a" * 299 + "b", "ä-agent", "my/agent", "my_agent", "..", "plain-agent"]
    sidecar = start_sidecar_process(data, env=FAST_ROLLS)
    acknowledged: list[tuple[str, str]] = []
    try:
        for name in names:
            spans = sdk_spans(3, service=name)
            assert post(sidecar.port, TRACES, otlp_body(spans))[0] == 200
            acknowledged += map(span_key, spans)
        wait_for(lambda: converted(sidecar.url), 30, "the conversion into Parquet")
        assert get(sidecar.url, "/ready")[0] == 200, "still ready after converting every service's spans"
        later = sdk_spans(4)
        assert post(sidecar.port, TRACES, otlp_body(later))[0] == 200
        acknowledged += map(span_key, later)
    finally:
        output = sidecar.stop(signal.SIGTERM)
    assert sidecar.process.returncode == 0, output
    assert sorted(span_keys(data)) == sorted(acknowledged), "every acknowledged span once"
    directories = {path.parent.name.removeprefix("service=") for path in dataset_files(data / "spans")}
    assert len(directories) == len(names) + 1, "no two services share a directory (otlp-agent for the later ones)"
    assert all(len(directory) <= 64 for directory in directories)
    assert path_segment_safe("a" * 300) != path_segment_safe("a" * 299 + "b")
    assert {"plain-agent", "my_agent"} <= directories and path_segment_safe("my/agent") in directories
    assert set(spans_table(data).column("service_name").to_pylist()) == {*names, "otlp-agent"}, "names kept whole"


def test_a_partition_the_filesystem_refuses_is_quarantined_and_the_other_spans_land(tmp_path: Path) -> None:
    data = tmp_path / "data"
    today = dt.datetime.now(dt.UTC).date().isoformat()
    blocked = data / "spans" / f"date={today}" / "service=blocked"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("a file where the partition directory should be")  # every write there fails: ENOTDIR
    sidecar = start_sidecar_process(data, env=FAST_ROLLS)
    try:
        refused = sdk_spans(5, service="blocked")
        fine = sdk_spans(6, service="fine")
        request = encode_spans([*refused, *fine])  # both services share one request and one commit
        assert post(sidecar.port, TRACES, request.SerializeToString())[0] == 200
        wait_for(lambda: converted(sidecar.url), 30, "the conversion")
        assert get(sidecar.url, "/ready")[0] == 200, "one partition's failure is not a disk failure"
        later = sdk_spans(3, service="fine")
        assert post(sidecar.port, TRACES, otlp_body(later))[0] == 200
        metrics = get(sidecar.url, "/metrics")[1].decode()
    finally:
        output = sidecar.stop(signal.SIGTERM)
    assert sidecar.process.returncode == 0, output
    assert "tracelearn_collector_spans_quarantined_total 5\n" in metrics
    assert "tracelearn_collector_quarantine_entries 1\n" in metrics
    assert sorted(span_keys(data)) == sorted(map(span_key, [*fine, *later]))
    [reason] = quarantine_reasons(data)
    assert reason["spans"] == 5 and f"cannot write {blocked}" in str(reason["reason"])
    rows = pq.read_table(data / "spans" / QUARANTINE_DIR / str(reason["file"]))
    assert sorted(zip(rows.column("trace_id").to_pylist(), rows.column("span_id").to_pylist(), strict=True)) == sorted(
        map(span_key, refused)
    ), "the refused spans are in the quarantine, whole"


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def left_behind(spool: Path, pid: int, sequence: int, records: list[LoggedRequest]) -> Path:
    """A request log segment of an exited collector (pid ``pid``) holding ``records``."""
    log = RequestLog(spool, chunk_bytes=1 << 20)
    log.append(records)
    log.seal()
    [path] = log.take_sealed()
    name = SegmentName("20261121T000000", local_host(), pid, "deadbeef", sequence)
    return path.rename(spool / log_file_name(name))


def logged(spans: list) -> LoggedRequest:
    body = otlp_body(spans)
    return LoggedRequest("application/x-protobuf", len(spans), (), len(body), body)


def test_replay_sets_a_bad_segment_aside_and_replays_the_others(tmp_path: Path) -> None:
    data = tmp_path / "data"
    spool = data / "spans" / SPOOL_DIR
    pid = dead_pid()
    first, second, third = sdk_spans(4), sdk_spans(5), sdk_spans(6)
    left_behind(spool, pid, 1, [logged(first)])
    damaged = left_behind(spool, pid, 2, [logged(second), logged(third)])
    raw = bytearray(damaged.read_bytes())
    raw[40] ^= 0xFF  # inside the first record: its checksum fails, and a record follows it
    damaged.write_bytes(bytes(raw))
    (spool / log_file_name(SegmentName("20261121T000000", local_host(), pid, "deadbeef", 3))).write_bytes(
        b"not a log at all"
    )
    after = sdk_spans(3)
    left_behind(spool, pid, 4, [logged(after)])

    sidecar = start_sidecar_process(data)
    try:
        assert get(sidecar.url, "/ready")[0] == 200, "ready at once: the logs it adopted convert while it serves"
        wait_for(lambda: converted(sidecar.url), 30, "the conversion of the adopted logs")
        status = status_of(sidecar.url)
        assert post(sidecar.port, TRACES, otlp_body(sdk_spans(2)))[0] == 200, "serving after the replay"
    finally:
        output = sidecar.stop(signal.SIGTERM)
    assert sidecar.process.returncode == 0, output
    keys = span_keys(data)
    assert set(map(span_key, [*first, *after])) <= set(keys) and len(keys) == len(set(keys)) == 4 + 3 + 2
    assert status["spans_replayed"] == 7 and status["segments_quarantined"] == 2
    reasons = {str(reason["file"]).rsplit(".", 1)[-1]: str(reason["reason"]) for reason in quarantine_reasons(data)}
    assert "fails its checksum" in reasons["bytes"], "the damaged rest of segment 2, kept for inspection"
    assert "not a version 1 request log" in reasons["otlp"], "segment 3, moved whole"
    assert not list(spool.glob("requests-*")), "nothing left to replay"


def out_of_range_request() -> tuple[ExportTraceServiceRequest, list]:
    good = sdk_spans(3)
    late, eventful = sdk_spans(2)  # a child with an event, and its root
    request = encode_spans([*good, late, eventful])
    spans = request.resource_spans[0].scope_spans[0].spans
    spans[3].start_time_unix_nano = spans[3].end_time_unix_nano = 2**63  # one past what timestamp[ns] holds
    assert late.events, "the child span carries an event"
    spans[4].CopyFrom(spans[3])
    spans[4].span_id = eventful.get_span_context().span_id.to_bytes(8, "big")
    spans[4].start_time_unix_nano = spans[4].end_time_unix_nano = spans[0].start_time_unix_nano
    spans[4].events[0].time_unix_nano = 2**64 - 1
    return request, good


def test_a_time_the_columns_cannot_hold_rejects_that_span_not_the_request(tmp_path: Path) -> None:
    """A span starting at 2^63 ns (or an event at 2^64-1) once got a 500 for its whole batch, which the SDK drops."""
    request, good = out_of_range_request()
    json_span = {"traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174", "name": "late",
                 "startTimeUnixNano": str(2**63), "endTimeUnixNano": str(2**64 - 1)}
    with running_sidecar(tmp_path) as sidecar:
        status, _, answer = post(sidecar.port, TRACES, request.SerializeToString())
        json_status, _, json_answer = post(sidecar.port, TRACES, json.dumps(
            {"resourceSpans": [{"scopeSpans": [{"spans": [json_span]}]}]}).encode(), JSON)
        feedback = [
            (b'{"rollout_id": "r", "name": "n", "value": 1, "time": "9999-01-01T00:00:00+00:00"}', "item 0: time"),
            (b'[{"rollout_id": "r", "name": "n", "value": 1}, {"rollout_id": "r", "name": "n", "value": 1, '
             b'"time": "1500-01-01T00:00:00+00:00"}]', "item 1: time"),
        ]
        answers = [(post(sidecar.port, "/v1/feedback", body), where) for body, where in feedback]
        assert post(sidecar.port, TRACES, otlp_body(sdk_spans(2)))[0] == 200, "serving on"
    assert status == 200
    partial = ExportTraceServiceResponse.FromString(answer).partial_success
    assert partial.rejected_spans == 2
    assert "start_time_unix_nano 9223372036854775808 is after 2262-04-11" in partial.error_message
    assert "events[0].time_unix_nano 18446744073709551615 is outside 1970..2262" in partial.error_message
    assert json_status == 200 and json.loads(json_answer)["partialSuccess"]["rejectedSpans"] == "1"
    for (code, _, body), where in answers:
        assert code == 400 and json.loads(body)["errors"][0].startswith(where), body
        assert "outside 1677-09-22 .. 2262-04-10" in json.loads(body)["errors"][0]
    assert set(map(span_key, good)) <= set(span_keys(tmp_path)) and len(span_keys(tmp_path)) == 5


def test_one_request_opens_a_bounded_number_of_partitions(tmp_path: Path) -> None:
    """20,000 feedback dates once made 20,000 directories with an fsynced file each (10,000 items is the most now)."""
    spans = sdk_spans(100)
    request = encode_spans(spans)
    day = 86_400 * 10**9
    for index, span in enumerate(request.resource_spans[0].scope_spans[0].spans):
        span.start_time_unix_nano -= index * day  # each span on a day of its own
        span.end_time_unix_nano = span.start_time_unix_nano + 1000
    base = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    many_dates = [{"rollout_id": "r", "name": "n", "value": 1, "time": (base + dt.timedelta(days=i)).isoformat()}
                  for i in range(10_000)]
    few_dates = many_dates[:16]
    with running_sidecar(tmp_path, max_partitions=64) as sidecar:
        status, _, answer = post(sidecar.port, TRACES, request.SerializeToString())
        feedback_status, _, feedback_answer = post(sidecar.port, "/v1/feedback", json.dumps(many_dates).encode())
        assert not (tmp_path / "feedback").exists(), "nothing written for a refused request"
        assert post(sidecar.port, "/v1/feedback", json.dumps(few_dates).encode())[0] == 200
    partial = ExportTraceServiceResponse.FromString(answer).partial_success
    assert status == 200 and partial.rejected_spans == 36
    assert "already has spans in 64 partitions (date, service)" in partial.error_message
    assert len({path.parent for path in dataset_files(tmp_path / "spans")}) == 64
    assert feedback_status == 400 and "the items fall on 10000 different dates; at most 16" in feedback_answer.decode()
    assert len(dataset_files(tmp_path / "feedback")) == 16


def test_dense_bodies_are_refused_before_the_parser_takes_their_memory(tmp_path: Path) -> None:
    """15 MB of empty spans once took 1.4 GB to parse; such a body now asks the queue for what it would hold."""
    spans = b"\x12\x00" * (6 << 20)  # 6 Mi empty spans, 2 bytes each
    scope_spans = b"\x12" + varint(len(spans)) + spans
    resource_spans = b"\x12" + varint(len(scope_spans)) + scope_spans
    dense = b"\x0a" + varint(len(resource_spans)) + resource_spans
    with running_sidecar(tmp_path, max_body_bytes=16 << 20, queue_bytes=32 << 20) as sidecar:
        started = time.monotonic()
        status, _, answer = post(sidecar.port, TRACES, dense)
        elapsed = time.monotonic() - started
        assert post(sidecar.port, TRACES, otlp_body(sdk_spans(2)))[0] == 200
    assert status == 413 and b"needs" in answer and b"more than the whole write queue" in answer
    assert elapsed < 30


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
