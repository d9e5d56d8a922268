"""Write what the framework matrix produces for people: the README table, or every run's raw spans.

    python tests/integration/frameworks/write_matrix.py readme          # rewrite README's Supported agents table
    python tests/integration/frameworks/write_matrix.py raw OUT [ID...] # run combinations, dump their spans

``raw`` runs each combination once (making its environment if needed) and writes
``OUT/<framework>__<instrumentation>.jsonl`` (one span a line: name, scope, parent, attributes,
events, the span type tracelearn gave it) and ``OUT/README.md``: per combination the spans by type,
LLM rows, token-id statuses, whether messages landed, rollouts and transitions of the default build,
and which checks of the test module pass.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[2]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from integration.frameworks import envs  # noqa: E402
from integration.frameworks import test_framework_matrix as contract  # noqa: E402
from integration.frameworks.matrix import Landed, run_combination  # noqa: E402
from support.scripted_llm_server import ScriptedLLMServer  # noqa: E402


def write_readme() -> None:
    text = contract.README.read_text(encoding="utf-8")
    section = contract.readme_section(text)
    if section is None:
        raise SystemExit(f"{contract.README} has no {contract.README_START!r} ... {contract.README_END!r} section")
    contract.README.write_text(text.replace(section, contract.supported_agents_markdown()), encoding="utf-8")


def verdicts(row: contract.Row, landed: Landed, server: ScriptedLLMServer) -> dict[str, str]:
    """Each check's outcome: ``ok`` or the first line of why it failed."""
    outcome = {}
    for name in contract.checks_of(row):
        try:
            if landed.returncode != 0:
                raise AssertionError(f"agent exited {landed.returncode}")
            if name == "token_ids":
                contract.check_token_ids(row, landed, server)
            else:
                contract.CHECKS[name](row, landed)
            outcome[name] = "ok"
        except Exception as error:  # a summary for people: every failure is reported, none stops the run
            outcome[name] = f"FAIL: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return outcome


def summary(row: contract.Row, landed: Landed, server: ScriptedLLMServer) -> dict[str, object]:
    spans = landed.raw_spans()
    llm = [s for s in spans if s["span_type"] == "llm"]
    transitions = landed.transitions()
    rollouts = landed.rollouts()
    return {
        "id": row.id,
        "env": row.env,
        "agent_exit": landed.returncode,
        "seconds": round(landed.seconds, 1),
        "pipeline_seconds": round(landed.pipeline_seconds, 1),
        "server_calls": len(landed.requests),
        "spans": len(spans),
        "spans_by_type": dict(Counter(str(s["span_type"]) for s in spans)),
        "spans_by_scope": dict(Counter(str(s["scope"]) for s in spans)),
        "llm_span_names": dict(Counter(s["name"] for s in llm)),
        "stats_llm_calls": (landed.stats or {}).get("llm_calls"),
        "token_ids_status": (landed.stats or {}).get("token_ids_status"),
        "llm_with_input_messages": sum(1 for s in llm if "gen_ai.input.messages" in s["attributes"]),
        "rollouts_default_build": None if rollouts is None else rollouts.num_rows,
        "transitions_default_build": None if transitions is None else transitions.num_rows,
        "checks": verdicts(row, landed, server),
        "stderr_tail": landed.stderr.strip().splitlines()[-3:],
        "build_output": landed.build_output.splitlines(),
    }


def write_raw(out: Path, ids: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = [row for row in contract.COMBINATIONS if not ids or row.id in ids]
    summaries = []
    with ScriptedLLMServer() as server, tempfile.TemporaryDirectory() as scratch:
        for row in rows:
            envs.create(row.env)
            started = time.monotonic()
            landed = run_combination(row.combination(), server, Path(scratch) / row.id)
            with (out / f"{row.id}.jsonl").open("w", encoding="utf-8") as lines:
                for span in landed.raw_spans():
                    lines.write(json.dumps(span, ensure_ascii=False, default=str) + "\n")
            summaries.append(summary(row, landed, server))
            print(f"{row.id}: {time.monotonic() - started:.1f} s, {summaries[-1]['checks']}", file=sys.stderr)
    previous = out / "summary.json"
    known = {s["id"]: s for s in json.loads(previous.read_text())} if previous.is_file() else {}
    known.update({s["id"]: s for s in summaries})
    ordered = [known[row.id] for row in contract.COMBINATIONS if row.id in known]
    previous.write_text(json.dumps(ordered, indent=1, default=str) + "\n", encoding="utf-8")
    (out / "README.md").write_text(render_summary(ordered), encoding="utf-8")


def render_summary(summaries: list[dict[str, object]]) -> str:
    lines = [
        "# Framework matrix: raw spans per combination",
        "",
        "Made by `python tests/integration/frameworks/write_matrix.py raw /work/notes/matrix-raw` (tracelearn "
        "as in the working tree at the time). `<id>.jsonl`: one span a line (name, scope, parent, attributes, "
        "events, the span_type tracelearn gave it). `summary.json`: the figures below and each check's outcome. "
        "`findings.md` (written by hand) says what each framework emits that surprised, and whom each failure is for.",
        "",
        "| combination | calls (server) | spans by type | LLM rows (stats) | token_ids_status | LLM spans with "
        "gen_ai.input.messages | rollouts / transitions (default build) | checks failing |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        checks = s["checks"]
        assert isinstance(checks, dict)
        failing = ", ".join(name for name, verdict in checks.items() if verdict != "ok") or "none"
        lines.append(
            f"| {s['id']} | {s['server_calls']} | {s['spans_by_type']} | {s['stats_llm_calls']} | "
            f"{s['token_ids_status']} | {s['llm_with_input_messages']} | "
            f"{s['rollouts_default_build']} / {s['transitions_default_build']} | {failing} |"
        )
    lines += ["", "## Why each check failed", ""]
    for s in summaries:
        checks = s["checks"]
        assert isinstance(checks, dict)
        for name, verdict in checks.items():
            if verdict != "ok":
                lines.append(f"- {s['id']} {name}: {verdict}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("readme")
    raw = commands.add_parser("raw")
    raw.add_argument("out", type=Path)
    raw.add_argument("ids", nargs="*")
    args = parser.parse_args()
    if args.command == "readme":
        write_readme()
    else:
        write_raw(args.out, args.ids)


if __name__ == "__main__":
    main()
