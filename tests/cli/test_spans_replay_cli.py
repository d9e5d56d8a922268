"""``tracelearn spans replay``: a dead process's spool becomes Parquet, once; live writers are left alone."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from click.testing import CliRunner

from tracelearn.cli.main import main
from tracelearn.collector.spool import SPOOL_DIR

VENV_BIN = Path(sys.executable).parent

# Flushes one rollout (rollout() returns once its spans are in the spool), then dies without rolling
# the spool into Parquet, as kill -9 would leave it.
DYING_AGENT = textwrap.dedent(
    """
    import os
    import tracelearn

    with tracelearn.rollout(task_id="t-1"):
        tracelearn.emit_reward(1.0)
    os._exit(0)
    """
)


def test_replay_turns_a_dead_process_spool_into_parquet_once(tmp_path: Path) -> None:
    script = tmp_path / "agent.py"
    script.write_text(DYING_AGENT, encoding="utf-8")
    env = {**os.environ, "TRACELEARN_DATA": str(tmp_path / "data"), "TRACELEARN_ROLL_SECONDS": "3600"}
    died = subprocess.run(
        [str(VENV_BIN / "opentelemetry-instrument"), sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert died.returncode == 0, died.stderr
    spool = tmp_path / "data" / "spans" / SPOOL_DIR
    assert len(list(spool.iterdir())) == 1 and not list((tmp_path / "data" / "spans").rglob("*.parquet"))

    before = CliRunner().invoke(main, ["transitions", "build", "--spans", str(tmp_path / "data"), "--out", "x"])
    assert "tracelearn spans replay" in before.output

    replayed = CliRunner().invoke(main, ["spans", "replay", str(tmp_path / "data")])
    assert replayed.exit_code == 0, replayed.output
    assert "replayed 1 spool segment(s): 2 spans written to Parquet" in replayed.output
    assert not list(spool.iterdir())
    stats = CliRunner().invoke(main, ["spans", "stats", str(tmp_path / "data")])
    assert "rollouts with a reward" in stats.output
    again = CliRunner().invoke(main, ["spans", "replay", str(tmp_path / "data")])
    assert again.exit_code == 0 and "replayed 0 spool segment(s): 0 spans" in again.output


def test_replay_of_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["spans", "replay", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "no such directory" in result.output and "Traceback" not in result.output
