"""Agent Lightning's span-to-triplet adapter on our spans: runs inside ``benchmarks/.venv-agl``.

Reads a tracelearn spans dataset (pyarrow only; no tracelearn import, the venv does not have it),
turns each rollout's rows into Agent Lightning 0.3.0 ``Span`` objects as its own tracer (AgentOps
instrumenting the OpenAI client against a vLLM server, plus ``agl.emit_reward``) records them, and
runs ``TracerTraceToTriplet().adapt(spans)`` once per rollout with its defaults
(``llm_call_match=r"openai\\.chat\\.completion"``, ``repair_hierarchy=True``, reward matching
``first_occurrence``). Mapping, row -> ``Span.from_attributes``:

- every span: ``trace_id``, ``span_id``, ``parent_id`` (``parent_span_id``), ``start_time`` /
  ``end_time`` in seconds, ``rollout_id``, ``sequence_id`` = row order within the rollout;
- LLM spans (``span_type == 'llm'``): name ``openai.chat.completion`` (AgentOps' span name),
  ``gen_ai.request.model``, ``gen_ai.response.model``, ``gen_ai.response.id``, the messages flattened
  as ``gen_ai.prompt.<i>.role/content`` and ``gen_ai.completion.0.role/content``, usage tokens, and
  the vLLM token ids as the list attributes ``prompt_token_ids`` / ``response_token_ids`` (what
  Agent Lightning's instrumentation patch records and what the adapter reads);
- agent spans: ``agent.name`` (the adapter's first agent-name rule, OpenAI Agents SDK style);
- reward spans: name ``agentlightning.annotation`` with ``agentlightning.reward.0.name = primary``
  and ``agentlightning.reward.0.value`` (what ``emit_reward(value)`` records in 0.3);
- rollout root and tool spans: their name and tool name.

Timed separately (``time.perf_counter``): reading + grouping the Parquet rows, converting rows into
``Span`` objects, and the ``adapt`` calls alone (the adapter's throughput). Writes JSON to ``--out``:
``{"timings": {...}, "rollouts": {rollout_id: [{"response_id", "prompt_token_ids",
"response_token_ids", "reward"}, ...]}}`` with the triplets in the adapter's order.

    benchmarks/.venv-agl/bin/python benchmarks/agentlightning_triplets.py --spans DIR --out triplets.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
from agentlightning.adapter import TracerTraceToTriplet
from agentlightning.types import Span

COLUMNS = [
    "trace_id",
    "span_id",
    "parent_span_id",
    "name",
    "start_time",
    "end_time",
    "span_type",
    "rollout_id",
    "agent_name",
    "request_model",
    "response_model",
    "response_id",
    "input_messages",
    "output_messages",
    "input_tokens",
    "output_tokens",
    "prompt_token_ids",
    "response_token_ids",
    "tool_name",
    "reward",
]


def read_rollouts(spans_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Rows of the spans dataset as dicts, grouped by ``rollout_id``, each rollout sorted by start."""
    table = ds.dataset(spans_dir, format="parquet", partitioning="hive").to_table(columns=COLUMNS)
    for name in ("start_time", "end_time"):  # nanoseconds since the epoch, as int64
        table = table.set_column(table.schema.get_field_index(name), name, table[name].cast(pa.int64()))
    by_rollout: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in table.to_pylist():
        by_rollout[row["rollout_id"]].append(row)
    for rows in by_rollout.values():
        rows.sort(key=lambda r: (r["start_time"], r["span_id"]))
    return dict(sorted(by_rollout.items()))


def _seconds(nanoseconds: int) -> float:
    return nanoseconds / 1e9


def _llm_attributes(row: dict[str, Any]) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "gen_ai.system": "OpenAI",
        "gen_ai.request.model": row["request_model"],
        "gen_ai.response.model": row["response_model"],
        "gen_ai.response.id": row["response_id"],
        "gen_ai.usage.prompt_tokens": row["input_tokens"],
        "gen_ai.usage.completion_tokens": row["output_tokens"],
        "llm.request.type": "chat",
    }
    for i, message in enumerate(json.loads(row["input_messages"] or "[]")):
        attributes[f"gen_ai.prompt.{i}.role"] = message.get("role")
        attributes[f"gen_ai.prompt.{i}.content"] = message.get("content")
    for i, message in enumerate(json.loads(row["output_messages"] or "[]")):
        attributes[f"gen_ai.completion.{i}.role"] = message.get("role")
        attributes[f"gen_ai.completion.{i}.content"] = message.get("content")
    if row["prompt_token_ids"] is not None:
        attributes["prompt_token_ids"] = list(row["prompt_token_ids"])
    if row["response_token_ids"] is not None:
        attributes["response_token_ids"] = list(row["response_token_ids"])
    return attributes


def to_agl_spans(rows: list[dict[str, Any]]) -> list[Span]:
    """One rollout's rows as Agent Lightning spans (see the module docstring for the mapping)."""
    spans = []
    for sequence, row in enumerate(rows):
        kind = row["span_type"]
        name = row["name"]
        attributes: dict[str, Any]
        if kind == "llm":
            name = "openai.chat.completion"
            attributes = _llm_attributes(row)
        elif kind == "agent":
            attributes = {"agent.name": row["agent_name"]}
        elif kind == "reward":
            name = "agentlightning.annotation"
            attributes = {"agentlightning.reward.0.name": "primary", "agentlightning.reward.0.value": row["reward"]}
        elif kind == "tool":
            attributes = {"gen_ai.tool.name": row["tool_name"]}
        else:
            attributes = {}
        spans.append(
            Span.from_attributes(
                attributes=attributes,
                rollout_id=row["rollout_id"],
                attempt_id="attempt-0",
                sequence_id=sequence,
                name=name,
                trace_id=row["trace_id"],
                span_id=row["span_id"],
                parent_id=row["parent_span_id"],
                start_time=_seconds(row["start_time"]),
                end_time=_seconds(row["end_time"]),
            )
        )
    return spans


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spans", type=Path, required=True, help="spans directory (date=/service= partitions)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the triplets and timings")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)

    started = time.perf_counter()
    rollouts = read_rollouts(args.spans)
    read_s = time.perf_counter() - started

    adapter = TracerTraceToTriplet()
    convert_s = adapt_s = 0.0
    n_spans = 0
    results: dict[str, list[dict[str, Any]]] = {}
    progress_every = max(len(rollouts) // 10, 1)
    for done, (rollout_id, rows) in enumerate(rollouts.items(), start=1):
        t0 = time.perf_counter()
        spans = to_agl_spans(rows)
        t1 = time.perf_counter()
        triplets = adapter.adapt(spans)
        t2 = time.perf_counter()
        convert_s += t1 - t0
        adapt_s += t2 - t1
        n_spans += len(rows)
        results[rollout_id] = [
            {
                "response_id": t.metadata.get("response_id"),
                "prompt_token_ids": list(t.prompt.get("token_ids") or []),
                "response_token_ids": list(t.response.get("token_ids") or []),
                "reward": t.reward,
            }
            for t in triplets
        ]
        if done % progress_every == 0:
            print(f"  agentlightning: {done}/{len(rollouts)} rollouts", file=sys.stderr, flush=True)
    timings = {
        "rollouts": len(rollouts),
        "spans": n_spans,
        "read_s": read_s,
        "convert_s": convert_s,
        "adapt_s": adapt_s,
        "python": sys.version.split()[0],
    }
    args.out.write_text(json.dumps({"timings": timings, "rollouts": results}))
    print(json.dumps(timings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
