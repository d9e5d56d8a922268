"""Faults while capturing, in real agent processes under ``opentelemetry-instrument``.

A killed agent (``kill -9``) must lose no rollout it flushed: the next writer on the host replays its
spool into the dataset, each rollout once and whole. A disk that refuses writes must leave only
complete, readable Parquet files, and the agent itself must keep running when the disk fails.
"""

import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.compute as pc

from tracelearn.collector.settings import CaptureSettings
from tracelearn.collector.span_exporter import ParquetSpanExporter
from tracelearn.collector.spool import SPOOL_DIR
from tracelearn.schemas.dataset import dataset_files, read_table
from tracelearn.storage.atomic_files import TEMP_PREFIX, TEMP_SUFFIX, path_segment_safe, remove_abandoned_temp_files

VENV_BIN = Path(sys.executable).parent

AGENT = textwrap.dedent(
    """
    import sys, time
    import tracelearn
    from opentelemetry import trace

    tracer = trace.get_tracer("fault-agent")
    rollouts = int(sys.argv[1])
    payload = "x" * int(sys.argv[2])
    i = 0
    while rollouts < 0 or i < rollouts:
        with tracelearn.rollout(task_id=f"t-{i}"):
            for step in range(3):
                with tracer.start_as_current_span("chat", attributes={"gen_ai.operation.name": "chat", "p": payload}):
                    pass
            tracelearn.emit_reward(1.0)
        print("flushed", i, flush=True)  # rollout() returns once its spans are on disk
        i += 1
        time.sleep(0.02)
    print("agent finished", i, flush=True)
    """
)


def start_agent(
    tmp_path: Path, rollouts: int, payload: int, preexec_fn: Callable[[], None] | None = None, **settings: str
) -> subprocess.Popen[str]:
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    env = {
        **os.environ,
        **settings,
        "TRACELEARN_DATA": str(tmp_path / "data"),
        "OTEL_SERVICE_NAME": "fault-agent",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
    }
    return subprocess.Popen(
        [str(VENV_BIN / "opentelemetry-instrument"), sys.executable, str(script), str(rollouts), str(payload)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec_fn,
    )


def test_kill_9_loses_no_flushed_rollout_and_the_next_writer_lands_each_once_and_whole(tmp_path: Path) -> None:
    agent = start_agent(tmp_path, rollouts=-1, payload=100, TRACELEARN_ROLL_SECONDS="3600")
    assert agent.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while len(lines) < 5 and time.monotonic() < deadline and agent.poll() is None:
        lines.append(agent.stdout.readline())
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    flushed = [line.split()[1] for line in lines + agent.stdout.readlines() if line.startswith("flushed ")]
    assert len(flushed) >= 5, agent.stderr.read() if agent.stderr else ""
    spans_root = tmp_path / "data" / "spans"
    assert not dataset_files(spans_root), "nothing rolled yet: the flushed rollouts are only in the spool"

    ParquetSpanExporter(CaptureSettings.from_env({"TRACELEARN_DATA": str(tmp_path / "data")})).shutdown()

    spans = read_table(spans_root, "spans")
    assert len(set(spans.column("span_id").to_pylist())) == len(spans), "no span twice"
    task_ids = set(spans.column("task_id").to_pylist())
    assert {f"t-{i}" for i in flushed} <= task_ids, "every rollout the agent flushed is in the dataset"
    for task_id in task_ids:
        rollout = spans.filter(pc.equal(spans.column("task_id"), task_id))
        assert sorted(rollout.column("span_type").to_pylist()) == ["llm", "llm", "llm", "reward", "rollout"]
    assert not list((spans_root / SPOOL_DIR).iterdir()), "the dead agent's spool is replayed and gone"
    assert not list(spans_root.rglob(f"*{TEMP_SUFFIX}"))


def test_a_disk_that_refuses_writes_never_stops_the_agent(tmp_path: Path) -> None:
    def limit_file_size() -> None:
        # Files above 4 KiB fail with EFBIG, as on a full disk (the signal would kill the process).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    agent = start_agent(tmp_path, rollouts=5, payload=20_000, preexec_fn=limit_file_size)
    stdout, stderr = agent.communicate(timeout=120)
    assert agent.returncode == 0, stderr
    assert "agent finished 5" in stdout
    assert stderr.count("spans stay buffered in memory and are retried") == 1, stderr
    assert "could not be written before shutdown" in stderr
    data = tmp_path / "data"
    assert not list(data.rglob(f"*{TEMP_SUFFIX}")), "a failed write must not leave its temp file"
    spans_root = data / "spans"
    if spans_root.exists():
        read_table(spans_root, "spans")  # whatever is there is complete


def test_temp_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    host = path_segment_safe(socket.gethostname())
    dead = tmp_path / f"{TEMP_PREFIX}part-x-{host}-{dead_pid}-abc-000001-{dead_pid}{TEMP_SUFFIX}"
    alive = tmp_path / f"{TEMP_PREFIX}part-x-{host}-{os.getpid()}-abc-000001-{os.getpid()}{TEMP_SUFFIX}"
    dead.write_bytes(b"torn")
    alive.write_bytes(b"being written")
    assert remove_abandoned_temp_files(tmp_path) == 1
    assert not dead.exists() and alive.exists()
