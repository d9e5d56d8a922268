"""Child processes: real programs started, watched, and stopped."""

import signal
import sys
import time
from pathlib import Path

import pytest

from tracelearn.processes import ChildExitedError, ChildProcessError, ChildTimeoutError, start_child

PY = sys.executable


def test_output_is_teed_to_log_callback_and_tail(tmp_path: Path) -> None:
    seen: list[str] = []
    log = tmp_path / "child.log"
    child = start_child([PY, "-c", "print('one'); print('two', flush=True)"], name="printer", log=log,
                        on_line=seen.append)
    assert child.wait(30) == 0
    assert seen == ["one", "two"]
    assert child.tail() == "two" and child.tail(2) == "one\ntwo"
    text = log.read_text()
    assert text.startswith("$ ") and text.endswith("one\ntwo\n")


def test_a_chatty_child_never_blocks_on_a_full_pipe() -> None:
    child = start_child([PY, "-c", "import sys\nfor i in range(200000): sys.stdout.write('x' * 80 + '\\n')"],
                        name="chatty")
    assert child.wait(60) == 0


def test_check_names_the_child_its_status_and_last_words() -> None:
    child = start_child([PY, "-c", "import sys; print('it broke'); sys.exit(3)"], name="failing tool")
    with pytest.raises(ChildExitedError, match=r"failing tool exited with code 3: it broke$") as info:
        child.check(30)
    assert info.value.returncode == 3


def test_a_timeout_stops_the_whole_process_group(tmp_path: Path) -> None:
    marker = tmp_path / "grandchild.pid"
    # The child starts a grandchild that would outlive it; both must be gone after the timeout.
    program = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(marker)!r}, 'w').write(str(p.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(600)\n"
    )
    child = start_child([PY, "-c", program], name="sleeper")
    child.wait_until(lambda: True if marker.exists() and marker.read_text() else None, 30, "started")
    with pytest.raises(ChildTimeoutError, match="sleeper ran past its timeout of 1 s and was killed; last line: "):
        child.wait(1)
    grandchild = int(marker.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{grandchild}").exists():
        status = Path(f"/proc/{grandchild}/status").read_text() if Path(f"/proc/{grandchild}/status").exists() else ""
        if "zombie" in status:
            break
        time.sleep(0.1)
    status = Path(f"/proc/{grandchild}/status")
    assert not status.exists() or "zombie" in status.read_text()


def test_wait_until_fails_fast_when_the_child_exits_before_ready() -> None:
    child = start_child([PY, "-c", "print('port in use'); raise SystemExit(1)"], name="server")
    started = time.monotonic()
    expected = "server exited with code 1 before answering: port in use"
    with pytest.raises(ChildExitedError, match=expected):
        child.wait_until(lambda: None, 60, "answering")
    assert time.monotonic() - started < 30


def test_stop_is_sigterm_then_sigkill_after_the_grace_period() -> None:
    graceful = start_child([PY, "-c", "import time; print('up', flush=True); time.sleep(600)"], name="graceful")
    graceful.wait_until(lambda: True if graceful.tail() == "up" else None, 30, "up")
    assert graceful.stop(grace_s=10) == -signal.SIGTERM
    stubborn = start_child(
        [PY, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); "
                   "time.sleep(600)"],
        name="stubborn",
    )
    stubborn.wait_until(lambda: True if stubborn.tail() == "up" else None, 30, "up")
    started = time.monotonic()
    assert stubborn.stop(grace_s=1) == -signal.SIGKILL
    assert time.monotonic() - started < 10


def test_a_program_that_does_not_exist_is_named() -> None:
    with pytest.raises(ChildProcessError, match="agent: cannot start '/no/such/program'"):
        start_child(["/no/such/program"], name="agent")
