"""Running one framework x instrumentation combination for real, and reading back what it landed.

A combination is an agent script run in its own environment (``envs.py``) as a subprocess under
``opentelemetry-instrument`` (traces to the tracelearn Parquet exporter, ``TRACELEARN_DATA`` a
temporary directory) against a ``ScriptedLLMServer``; then that environment's own ``tracelearn``
CLI (the base install) runs ``spans stats --json`` and ``transitions build`` with no config, and
the datasets are read back with the library's readers. Nothing here asserts: the test module holds
the contract, ``write_matrix.py`` dumps raw spans for people.

The agent's process gets a clean environment: no ``OPENAI_API_KEY`` unless its row sets one (the
agents here pass their key to the client themselves, so the Agents SDK's default trace exporter has
no key and posts nothing) and HTTP(S) proxies pointing at a closed loopback port with only the
loopback excluded, so any call a framework tries to make off this machine (telemetry, price lists,
tokenizer downloads) fails fast here instead of leaving it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from integration.frameworks import envs
from support.scripted_llm_server import ScriptedLLMServer

HERE = Path(__file__).resolve().parent
AGENTS = HERE / "agents"
CALC_AGENT = envs.REPO / "examples" / "calc" / "agent.py"
AGENT_TIMEOUT_S = 180
CLOSED_PORT_PROXY = "http://127.0.0.1:9"
# Variables of the test process that must not leak into an agent's (they would change what it captures).
_DROPPED_PREFIXES = ("OTEL_", "TRACELEARN_", "TRACELOOP_", "OPENAI_", "OPENINFERENCE_", "VIRTUAL_ENV", "PYTHON")


@dataclass(frozen=True)
class Combination:
    """One agent with one instrumentation: what to run and in which environment."""

    framework: str  # key of FRAMEWORKS in the test module
    variant: str  # "" or the mode of a framework run several ways (sync, async, stream, no-span)
    instrumentation: str  # traceloop, openinference, genai, native
    env: str  # environment name (envs/<env>.in)
    argv: tuple[str, ...]  # after the environment's python
    extra_env: Mapping[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        framework = f"{self.framework}-{self.variant}" if self.variant else self.framework
        return f"{framework}__{self.instrumentation}"


@dataclass
class Landed:
    """What one run landed and what the server saw."""

    combination: Combination
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    requests: list[dict[str, Any]]  # chat-completions request bodies, in arrival order
    data: Path
    out: Path
    stats: dict[str, Any] | None = None
    stats_error: str = ""
    build_output: str = ""
    build_returncode: int = 0
    pipeline_seconds: float = 0.0  # spans stats + transitions build

    def spans(self) -> pa.Table:
        from tracelearn.schemas.dataset import read_table

        return read_table(self.data / "spans", "spans")

    def transitions(self) -> pa.Table | None:
        return self._output("transitions")

    def rollouts(self) -> pa.Table | None:
        return self._output("rollouts")

    def _output(self, table: str) -> pa.Table | None:
        from tracelearn.schemas.dataset import read_table

        root = self.out / table
        return read_table(root, table) if root.is_dir() and any(root.rglob("*.parquet")) else None

    def raw_spans(self) -> list[dict[str, Any]]:
        """Every span as written (plain pyarrow, no migration), oldest first, for people to read."""
        files = sorted((self.data / "spans").rglob("*.parquet")) if (self.data / "spans").is_dir() else []
        rows = [row for path in files for row in pq.read_table(path).to_pylist()]
        rows.sort(key=lambda row: (row["start_time"], row["span_id"]))
        return [_raw(row) for row in rows]


def _raw(row: dict[str, Any]) -> dict[str, Any]:
    events = [
        {"name": e["name"], "attributes": dict(e["attributes"] or [])} for e in row.get("events") or []
    ]
    return {
        "trace_id": row["trace_id"],
        "span_id": row["span_id"],
        "parent_span_id": row["parent_span_id"],
        "name": row["name"],
        "kind": row.get("kind"),
        "scope": row.get("scope_name"),
        "status": row.get("status_code"),
        "status_message": row.get("status_message"),
        "span_type": row.get("span_type"),
        "duration_ms": round((row.get("duration_ns") or 0) / 1e6, 2),
        "attributes": dict(row["attributes"] or []),
        "events": events,
    }


def agent_environment(combination: Combination, base_url: str, data: Path) -> dict[str, str]:
    kept = {k: v for k, v in os.environ.items() if not k.upper().startswith(_DROPPED_PREFIXES)}
    bin_dir = envs.env_bin(combination.env)
    return {
        **kept,
        "PATH": f"{bin_dir}{os.pathsep}{kept.get('PATH', '/usr/bin:/bin')}",
        "TRACELEARN_DATA": str(data),
        "OTEL_SERVICE_NAME": combination.id.replace("__", "."),
        "OPENAI_BASE_URL": base_url,
        "LLM_API_KEY": "not-needed",
        "HTTP_PROXY": CLOSED_PORT_PROXY,
        "HTTPS_PROXY": CLOSED_PORT_PROXY,
        "http_proxy": CLOSED_PORT_PROXY,
        "https_proxy": CLOSED_PORT_PROXY,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "HF_HUB_OFFLINE": "1",
        **combination.extra_env,
    }


def run_combination(combination: Combination, server: ScriptedLLMServer, workdir: Path) -> Landed:
    """Run the agent under ``opentelemetry-instrument``, then ``spans stats`` and ``transitions build``."""
    data, out = workdir / "data", workdir / "out"
    bin_dir = envs.env_bin(combination.env)
    environment = agent_environment(combination, server.base_url, data)
    before = len(server.chat_requests())
    started = time.monotonic()
    done = subprocess.run(
        [str(bin_dir / "opentelemetry-instrument"), str(bin_dir / "python"), *combination.argv],
        cwd=AGENTS,
        env=environment,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=AGENT_TIMEOUT_S,
        check=False,
    )
    landed = Landed(
        combination=combination,
        returncode=done.returncode,
        stdout=done.stdout,
        stderr=done.stderr,
        seconds=time.monotonic() - started,
        requests=server.chat_requests()[before:],
        data=data,
        out=out,
    )
    started = time.monotonic()
    cli = str(bin_dir / "tracelearn")
    stats = subprocess.run([cli, "spans", "stats", str(data), "--json"], env=environment, capture_output=True,
                           text=True, timeout=AGENT_TIMEOUT_S, check=False)
    if stats.returncode == 0:
        landed.stats = json.loads(stats.stdout)
    else:
        landed.stats_error = stats.stderr.strip() or stats.stdout.strip()
    build = subprocess.run([cli, "transitions", "build", "--spans", str(data), "--out", str(out)], env=environment,
                           capture_output=True, text=True, timeout=AGENT_TIMEOUT_S, check=False)
    landed.build_output = (build.stdout + build.stderr).strip()
    landed.build_returncode = build.returncode
    landed.pipeline_seconds = time.monotonic() - started
    return landed
