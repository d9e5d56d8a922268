"""The collector ingest benchmark's own machinery: unique bodies that decode to the spans it names, and
the check of acknowledged spans against the dataset, end to end against a real sidecar process."""

import sys
from pathlib import Path

import pytest

from tracelearn.collector.otlp_decode import decode_protobuf

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import collector_ingest as ci  # noqa: E402


@pytest.fixture(scope="module")
def workload() -> ci.Workload:
    return ci.build_workload(spans=6 * 32, batch_size=32, template_bodies=2)


def keys_of(body: bytes) -> list[str]:
    return [format(r.trace_id, "032x") + format(r.span_id, "016x") for r in decode_protobuf(body).records]


def test_every_body_is_unique_and_decodes_to_the_spans_it_names(workload: ci.Workload) -> None:
    maker = ci.BodyMaker(workload)
    seen: set[str] = set()
    for body in range(workload.bodies):
        keys = keys_of(maker.body(body))
        assert keys == maker.keys(body)
        assert seen.isdisjoint(keys)
        seen.update(keys)
    assert len(seen) == workload.spans == 6 * 32


def test_bodies_carry_agl_rollout_identity_and_renaming_keeps_their_size(workload: ci.Workload) -> None:
    renamed = workload.with_identities(ci.placeholder_identities(workload.traces, seed=7))
    assert [len(t) for t in renamed.templates] == [len(t) for t in workload.templates]
    records = decode_protobuf(ci.BodyMaker(renamed).body(0)).records
    rollout_ids = {r.attributes[ci.AGL_ROLLOUT_ID] for r in records}
    assert rollout_ids <= {i.rollout_id for i in renamed.identities}
    assert all(ci.AGL_ATTEMPT_ID in r.attributes for r in records)


@pytest.mark.slow
def test_acknowledged_spans_are_found_in_the_sidecars_dataset_exactly_once(
    tmp_path: Path, workload: ci.Workload
) -> None:
    server = ci.start_sidecar(tmp_path / "data", tmp_path / "sidecar.log")
    try:
        run = ci.run_clients(server, workload, connections=2, bodies=range(workload.bodies))
    finally:
        ended = server.stop()
    assert ended.returncode == 0, ended.log_tail
    assert sorted(run.report.acked) == list(range(workload.bodies))
    check = ci.check_dataset(tmp_path / "data" / "spans", ci.BodyMaker(workload), run.report.acked)
    assert check.exact and check.rows == check.acknowledged == workload.spans
