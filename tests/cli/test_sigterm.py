"""SIGTERM to a ``tracelearn`` command stops what it started: an evaluation killed while its agent runs
leaves neither its model server nor its agent behind (they run in sessions of their own, so only the
command itself can stop them)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.calc_example import CALC_PIPELINE, HELD_OUT
from support.tiny_model import build_tiny_model

TRACELEARN = Path(sys.executable).parent / "tracelearn"


def children_of(pid: int) -> dict[int, str]:
    """Live direct children of ``pid``: pid -> command line."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found[int(entry.name)] = command
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


@pytest.mark.slow
def test_sigterm_to_an_evaluation_stops_its_model_server_and_its_agent(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "model")
    agent = f"{sys.executable} -c 'import time; time.sleep(300)'"
    evaluation = subprocess.Popen(
        [str(TRACELEARN), "eval", "--model", str(model), "--agent", agent, "--tasks", str(HELD_OUT), "--limit", "1",
         "--config", str(CALC_PIPELINE), "--out", str(tmp_path / "eval")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"},
    )
    started: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 240
        while not any("time.sleep(300)" in command for command in started.values()):
            assert evaluation.poll() is None, evaluation.communicate()[0].decode()
            assert time.monotonic() < deadline, f"the agent never started; children: {started}"
            time.sleep(0.5)
            started = children_of(evaluation.pid)
        assert any(" serve " in command for command in started.values()), started

        evaluation.send_signal(signal.SIGTERM)
        output = evaluation.communicate(timeout=60)[0].decode()
        assert evaluation.returncode != 0, output

        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = {pid: command for pid, command in started.items() if alive(pid)}
        assert not left, f"still running after the evaluation stopped: {left}\n{output}"
    finally:
        if evaluation.poll() is None:
            evaluation.kill()
        for pid in started:  # on failure: what outlived the evaluation, reparented by now
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
