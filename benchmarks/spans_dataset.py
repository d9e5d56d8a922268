"""A realistic, deterministic spans dataset of any size, written fast, for the pipeline benchmarks.

What one rollout looks like (the shape a multi-agent app instrumented with tracelearn records):

- a root span ``tracelearn.rollout`` (span_type ``rollout``) carrying the rollout identity;
- 2-4 agent turns (``invoke_agent <name>``, span_type ``agent``, ``gen_ai.agent.name``) cycling
  planner -> writer -> critic, strictly one after the other, together 3-8 LLM calls;
- per LLM call a ``chat <model>`` span (span_type ``llm``) with OpenAI-style JSON messages in
  ``input_messages`` (a system prompt plus the agent's growing history, 200-2000 characters) and
  ``output_messages``, usage tokens, a unique ``gen_ai.response.id`` (``chatcmpl-<span_id>``), and
  prompt / response token ids and response logprobs as the model server returned them (status
  ``server``): the prompt ids of an agent's next call extend the previous call's prompt and
  response, as a chat template would;
- after about half of the calls an ``execute_tool <name>`` span (span_type ``tool``);
- a ``tracelearn.reward`` span (primary reward, 0 or 1) after the last call.

Rollouts come in GRPO groups: 8 rollouts per task (``task_id``), ``group_id`` the task family.
Rollout ``i`` starts at a time spread evenly over ``--days`` days from 2026-11-20 00:00 UTC, so the
dataset spans several ``date=`` partitions; the service (``research-team`` or ``support-team``)
follows the task. Ids: trace id = rollout index (hex), span ids numbered within the run, rollout ids
``r<index:09d>``. Everything is a pure function of ``--seed`` and ``--spans``.

The rows are the spans schema (``SPANS.schema_with_metadata()``) built directly as Arrow columns, not
span by span through ``SpanColumns`` (that path runs ~30 µs/span; this one is ~10x faster, so 10M
spans take minutes); the promoted columns hold what ``SpanColumns`` derives from the same attributes,
and the raw ``attributes`` map holds the identity, ``gen_ai.*`` scalars and the token-id status
(the message texts only in the promoted columns). Files are written with the collector's atomic
writer (``write_parquet_atomically``, zstd) under ``OUT/spans/date=YYYY-MM-DD/service=NAME/``.

    .venv/bin/python benchmarks/spans_dataset.py --spans 1000000 --out /tmp/tracelearn-bench/spans-1m
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from tracelearn.schemas import semconv as sc
from tracelearn.schemas.tables import SPANS, STRING_MAP
from tracelearn.storage.atomic_files import partition_directory
from tracelearn.storage.atomic_parquet import write_parquet_atomically

__all__ = ["EPOCH", "ROLLOUTS_PER_TASK", "DatasetSpec", "write_spans_dataset"]

EPOCH = dt.datetime(2026, 11, 20, tzinfo=dt.UTC)
EPOCH_NS = int(EPOCH.timestamp()) * 1_000_000_000
ROLLOUTS_PER_TASK = 8
AGENTS = ("planner", "writer", "critic")
MODEL = "qwen2.5-1.5b-instruct"
SERVICES = ("research-team", "support-team")
TOOLS = ("web_search", "calculator", "read_file", "python")
SCOPE = "opentelemetry.instrumentation.openai_v2"
VOCABULARY_SIZE = 151_000
CHUNK_SPANS = 120_000
SYSTEM_PROMPTS = {
    "planner": "You are the planner. Break the user's request into numbered steps and assign them.",
    "writer": "You are the writer. Follow the plan and write a clear, complete answer with sources.",
    "critic": "You are the critic. Check the draft against the request; list concrete problems.",
}
WORDS = (
    "the",
    "agent",
    "plan",
    "draft",
    "review",
    "source",
    "table",
    "value",
    "result",
    "query",
    "answer",
    "step",
    "check",
    "model",
    "token",
    "reward",
    "group",
    "task",
    "report",
    "summary",
    "policy",
    "data",
    "file",
    "search",
    "compute",
    "total",
    "number",
    "list",
    "because",
    "however",
    "therefore",
    "first",
    "second",
    "final",
    "revised",
    "correct",
    "missing",
    "unclear",
)


@dataclass(frozen=True)
class DatasetSpec:
    """What to generate: about ``spans`` spans (whole rollouts), from ``seed``, over ``days`` days."""

    spans: int
    seed: int = 0
    days: int = 3


@dataclass
class _Columns:
    """Column buffers of one chunk of spans (Python lists and flat id buffers)."""

    values: dict[str, list[Any]] = field(default_factory=lambda: {name: [] for name in SPANS.schema.names})
    attribute_keys: list[str] = field(default_factory=list)
    attribute_values: list[str] = field(default_factory=list)
    attribute_offsets: list[int] = field(default_factory=lambda: [0])
    id_lists: dict[str, list[np.ndarray | None]] = field(
        default_factory=lambda: {"prompt_token_ids": [], "response_token_ids": [], "response_logprobs": []}
    )
    partitions: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.partitions)


def _text(rng: random.Random, corpus: str, length: int) -> str:
    """``length`` characters of word salad (a slice of a pre-built corpus at a random offset)."""
    start = rng.randrange(0, len(corpus) - length - 1)
    return corpus[start : start + length]


class _RolloutWriter:
    """Appends the spans of one rollout after another to ``_Columns``."""

    def __init__(self, spec: DatasetSpec, n_rollouts: int) -> None:
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.np_rng = np.random.default_rng(spec.seed)
        self.corpus = " ".join(self.rng.choice(WORDS) for _ in range(200_000))
        self.span_counter = 0
        self.window_ns = spec.days * 86_400 * 1_000_000_000 - 3_600 * 1_000_000_000
        self.n_rollouts = max(n_rollouts, 1)
        self.days: dict[int, str] = {}
        self.resource_keys = [sc.SERVICE_NAME, "telemetry.sdk.language", "telemetry.sdk.version"]

    def _day(self, start_ns: int) -> str:
        day = start_ns // (86_400 * 1_000_000_000)
        text = self.days.get(day)
        if text is None:
            text = (dt.date(1970, 1, 1) + dt.timedelta(days=day)).isoformat()
            self.days[day] = text
        return text

    def _span(
        self,
        cols: _Columns,
        *,
        trace_hex: str,
        parent: str | None,
        name: str,
        start_ns: int,
        end_ns: int,
        span_type: str,
        identity: dict[str, str],
        service: str,
        agent: str | None = None,
        extra: dict[str, str] | None = None,
        promoted: dict[str, Any] | None = None,
        ids: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> str:
        self.span_counter += 1
        span_id = format(self.span_counter, "016x")
        v = cols.values
        v["trace_id"].append(trace_hex)
        v["span_id"].append(span_id)
        v["parent_span_id"].append(parent)
        v["name"].append(name)
        v["kind"].append("CLIENT" if span_type == sc.TYPE_LLM else "INTERNAL")
        v["start_time"].append(start_ns)
        v["end_time"].append(end_ns)
        v["duration_ns"].append(end_ns - start_ns)
        v["status_code"].append("UNSET")
        v["status_message"].append(None)
        v["service_name"].append(service)
        v["scope_name"].append(SCOPE if span_type == sc.TYPE_LLM else "tracelearn")
        v["resource_attributes"].append(service)
        v["events"].append(None)
        v["links"].append(None)
        v["span_type"].append(span_type)
        v["rollout_id"].append(identity[sc.ROLLOUT_ID])
        v["attempt_id"].append(None)
        v["task_id"].append(identity[sc.TASK_ID])
        v["group_id"].append(identity[sc.GROUP_ID])
        v["agent_name"].append(agent)
        promoted = promoted or {}
        for column in (
            "operation_name",
            "request_model",
            "response_model",
            "response_id",
            "finish_reason",
            "input_messages",
            "output_messages",
            "input_tokens",
            "output_tokens",
            "request_temperature",
            "request_top_p",
            "request_top_k",
            "messages_problem",
            "token_ids_status",
            "tool_name",
            "reward",
            "reward_name",
            "reward_is_primary",
        ):
            v[column].append(promoted.get(column))
        keys = cols.attribute_keys
        values = cols.attribute_values
        for key, value in identity.items():
            keys.append(key)
            values.append(value)
        if agent is not None:
            keys.append(sc.AGENT_NAME)
            values.append(agent)
        if extra:
            for key, value in extra.items():
                keys.append(key)
                values.append(value)
        cols.attribute_offsets.append(len(keys))
        prompt, response, logprobs = ids if ids is not None else (None, None, None)
        cols.id_lists["prompt_token_ids"].append(prompt)
        cols.id_lists["response_token_ids"].append(response)
        cols.id_lists["response_logprobs"].append(logprobs)
        cols.partitions.append((self._day(start_ns), service))
        return span_id

    def rollout(self, cols: _Columns, index: int) -> None:
        """Append rollout ``index``'s spans."""
        rng = self.rng
        task = index // ROLLOUTS_PER_TASK
        family = task % 50
        service = SERVICES[task % len(SERVICES)]
        identity = {
            sc.ROLLOUT_ID: f"r{index:09d}",
            sc.TASK_ID: f"task-{task:08d}",
            sc.GROUP_ID: f"family-{family:02d}",
        }
        trace_hex = format(index + 1, "032x")
        start = EPOCH_NS + index * (self.window_ns // self.n_rollouts) + rng.randrange(0, 1_000_000_000)
        user_question = f"Task {task}: " + _text(random.Random(task), self.corpus, 120 + task % 200)
        n_calls = rng.randint(3, 8)
        turns: list[tuple[str, int]] = []
        remaining = n_calls
        turn = 0
        while remaining > 0:
            calls = min(remaining, rng.randint(1, 3))
            turns.append((AGENTS[turn % len(AGENTS)], calls))
            remaining -= calls
            turn += 1

        clock = start + 1_000_000
        root_start = start
        root_index = len(cols)
        root = self._span(
            cols,
            trace_hex=trace_hex,
            parent=None,
            name=sc.SPAN_ROLLOUT,
            start_ns=root_start,
            end_ns=root_start,  # fixed below
            span_type=sc.TYPE_ROLLOUT,
            identity=identity,
            service=service,
            extra={sc.SPAN_TYPE: sc.TYPE_ROLLOUT},
        )
        histories: dict[str, list[dict[str, str]]] = {}
        token_streams: dict[str, np.ndarray] = {}
        for agent, calls in turns:
            agent_start = clock
            agent_index = len(cols)
            agent_span = self._span(
                cols,
                trace_hex=trace_hex,
                parent=root,
                name=f"invoke_agent {agent}",
                start_ns=agent_start,
                end_ns=agent_start,
                span_type=sc.TYPE_AGENT,
                identity=identity,
                service=service,
                agent=agent,
                extra={sc.GEN_AI_OPERATION_NAME: "invoke_agent", sc.GEN_AI_AGENT_NAME: agent},
                promoted={"operation_name": "invoke_agent"},
            )
            clock += 200_000
            opening = [{"role": "system", "content": SYSTEM_PROMPTS[agent]}, {"role": "user", "content": user_question}]
            history = histories.setdefault(agent, opening)
            for _ in range(calls):
                history.append({"role": "user", "content": _text(rng, self.corpus, rng.randint(40, 160))})
                input_json = json.dumps(history)
                while len(input_json) > 2000 and len(history) > 3:
                    del history[2]
                    input_json = json.dumps(history)
                answer = _text(rng, self.corpus, rng.randint(60, 300))
                output_json = json.dumps([{"role": "assistant", "content": answer}])
                prompt_len = max(len(input_json) // 4, 8)
                response_len = max(len(answer) // 4, 1)
                stream = token_streams.get(agent)
                if stream is None or len(stream) < prompt_len:
                    grown = self.np_rng.integers(0, VOCABULARY_SIZE, size=prompt_len + 512, dtype=np.int32)
                    if stream is not None:
                        grown[: len(stream)] = stream
                    stream = grown
                prompt_ids = stream[:prompt_len]
                response_ids = self.np_rng.integers(0, VOCABULARY_SIZE, size=response_len, dtype=np.int32)
                # The next prompt starts with this prompt and this response (chat-template style).
                stream = np.concatenate([prompt_ids, response_ids, stream[prompt_len + response_len :]])
                token_streams[agent] = stream
                logprobs = -self.np_rng.exponential(0.4, size=response_len).astype(np.float32)
                call_start = clock
                call_end = call_start + rng.randrange(300_000_000, 4_000_000_000)
                span_id_next = format(self.span_counter + 1, "016x")
                response_id = f"chatcmpl-{span_id_next}"
                self._span(
                    cols,
                    trace_hex=trace_hex,
                    parent=agent_span,
                    name=f"chat {MODEL}",
                    start_ns=call_start,
                    end_ns=call_end,
                    span_type=sc.TYPE_LLM,
                    identity=identity,
                    service=service,
                    agent=agent,
                    extra={
                        sc.GEN_AI_OPERATION_NAME: "chat",
                        sc.GEN_AI_SYSTEM: "openai",
                        sc.GEN_AI_REQUEST_MODEL: MODEL,
                        sc.GEN_AI_RESPONSE_MODEL: MODEL,
                        sc.GEN_AI_RESPONSE_ID: response_id,
                        sc.GEN_AI_RESPONSE_FINISH_REASONS: '["stop"]',
                        sc.GEN_AI_USAGE_INPUT_TOKENS: str(prompt_len),
                        sc.GEN_AI_USAGE_OUTPUT_TOKENS: str(response_len),
                        sc.TOKEN_IDS_STATUS: sc.TOKEN_IDS_FROM_SERVER,
                    },
                    promoted={
                        "operation_name": "chat",
                        "request_model": MODEL,
                        "response_model": MODEL,
                        "response_id": response_id,
                        "finish_reason": "stop",
                        "input_messages": input_json,
                        "output_messages": output_json,
                        "input_tokens": prompt_len,
                        "output_tokens": response_len,
                        "token_ids_status": sc.TOKEN_IDS_FROM_SERVER,
                    },
                    ids=(prompt_ids, response_ids, logprobs),
                )
                history.append({"role": "assistant", "content": answer})
                clock = call_end + 1_000_000
                if rng.random() < 0.5:
                    tool = TOOLS[rng.randrange(len(TOOLS))]
                    tool_end = clock + rng.randrange(5_000_000, 800_000_000)
                    self._span(
                        cols,
                        trace_hex=trace_hex,
                        parent=agent_span,
                        name=f"execute_tool {tool}",
                        start_ns=clock,
                        end_ns=tool_end,
                        span_type=sc.TYPE_TOOL,
                        identity=identity,
                        service=service,
                        agent=agent,
                        extra={sc.GEN_AI_OPERATION_NAME: "execute_tool", sc.GEN_AI_TOOL_NAME: tool},
                        promoted={"operation_name": "execute_tool", "tool_name": tool},
                    )
                    clock = tool_end + 1_000_000
            cols.values["end_time"][agent_index] = clock
            cols.values["duration_ns"][agent_index] = clock - agent_start
            clock += 1_000_000
        reward = 1.0 if rng.random() < 0.3 + 0.4 * (family / 50) else 0.0
        self._span(
            cols,
            trace_hex=trace_hex,
            parent=root,
            name=sc.SPAN_REWARD,
            start_ns=clock,
            end_ns=clock,
            span_type=sc.TYPE_REWARD,
            identity=identity,
            service=service,
            extra={
                sc.SPAN_TYPE: sc.TYPE_REWARD,
                sc.REWARD_NAME: "reward",
                sc.REWARD_VALUE: repr(reward),
                sc.REWARD_PRIMARY: "true",
            },
            promoted={"reward": reward, "reward_name": "reward", "reward_is_primary": True},
        )
        clock += 1_000_000
        cols.values["end_time"][root_index] = clock
        cols.values["duration_ns"][root_index] = clock - root_start


def _list_array(parts: list[np.ndarray | None], value_type: pa.DataType) -> pa.Array:
    """A list array from per-row numpy arrays (``None`` = null row), built from offsets, no Python per id."""
    lengths = np.fromiter((0 if p is None else len(p) for p in parts), dtype=np.int32, count=len(parts))
    offsets = np.zeros(len(parts) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    present = [p for p in parts if p is not None]
    flat = np.concatenate(present) if present else np.zeros(0)
    mask = pa.array([p is None for p in parts], pa.bool_())
    values = pa.array(flat.astype(value_type.to_pandas_dtype(), copy=False), type=value_type)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, mask=mask)


def _resource_array(services: list[str]) -> pa.Array:
    keys: list[str] = []
    values: list[str] = []
    offsets = [0]
    for service in services:
        keys += [sc.SERVICE_NAME, "telemetry.sdk.language", "telemetry.sdk.version"]
        values += [service, "python", "1.45.1"]
        offsets.append(len(keys))
    return pa.MapArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(keys), pa.array(values), type=STRING_MAP)


def _to_table(cols: _Columns) -> pa.Table:
    schema = SPANS.schema_with_metadata()
    arrays: list[pa.Array] = []
    for spec_field in SPANS.schema:
        name = spec_field.name
        if name == "attributes":
            arrays.append(
                pa.MapArray.from_arrays(
                    pa.array(cols.attribute_offsets, pa.int32()),
                    pa.array(cols.attribute_keys, pa.string()),
                    pa.array(cols.attribute_values, pa.string()),
                    type=STRING_MAP,
                )
            )
        elif name == "resource_attributes":
            arrays.append(_resource_array(cols.values[name]))
        elif name in cols.id_lists:
            arrays.append(_list_array(cols.id_lists[name], spec_field.type.value_type))
        elif name in ("events", "links"):
            arrays.append(pa.nulls(len(cols), spec_field.type))
        else:
            arrays.append(pa.array(cols.values[name], type=spec_field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _write_chunk(cols: _Columns, spans_root: Path, chunk_index: int) -> list[Path]:
    """Write one chunk as one zstd Parquet file per (date, service) partition it touches."""
    table = _to_table(cols)
    keys = np.array([f"{d}|{s}" for d, s in cols.partitions])
    written = []
    for key in sorted(set(keys.tolist())):
        date, service = key.split("|")
        rows = np.flatnonzero(keys == key)
        part = table.take(pa.array(rows))
        directory = partition_directory(spans_root, ["date", "service"], (date, service))
        written.append(write_parquet_atomically(part, directory, f"part-{chunk_index:05d}.parquet", "zstd"))
    return written


def estimate_rollouts(spans: int) -> int:
    """Rollouts needed for about ``spans`` spans (a rollout averages ~13.3 spans)."""
    return max(1, round(spans / 13.3))


def write_spans_dataset(spec: DatasetSpec, out: Path, progress: bool = True) -> dict[str, int]:
    """Write the dataset under ``out/spans``; returns ``{"spans": ..., "rollouts": ..., "files": ...}``.

    Writes whole rollouts until at least ``spec.spans`` spans are written.
    """
    from tqdm import tqdm

    spans_root = out / "spans"
    n_rollouts = estimate_rollouts(spec.spans)
    writer = _RolloutWriter(spec, n_rollouts)
    cols = _Columns()
    written_spans = 0
    files = 0
    chunk = 0
    index = 0
    bar = tqdm(total=spec.spans, unit="span", unit_scale=True, desc="spans", disable=not progress, file=sys.stderr)
    while written_spans + len(cols) < spec.spans:
        before = len(cols)
        writer.rollout(cols, index)
        bar.update(len(cols) - before)
        index += 1
        if len(cols) >= CHUNK_SPANS:
            written_spans += len(cols)
            files += len(_write_chunk(cols, spans_root, chunk))
            chunk += 1
            cols = _Columns()
    if len(cols):
        written_spans += len(cols)
        files += len(_write_chunk(cols, spans_root, chunk))
    bar.close()
    return {"spans": written_spans, "rollouts": index, "files": files}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spans", type=int, default=1_000_000, help="at least this many spans (whole rollouts)")
    parser.add_argument("--out", type=Path, required=True, help="data root; spans go to OUT/spans/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--days", type=int, default=3, help="spread rollouts over this many days")
    args = parser.parse_args(argv)
    if (args.out / "spans").exists():
        parser.error(f"{args.out / 'spans'} exists; choose an empty --out")
    started = time.perf_counter()
    counts = write_spans_dataset(DatasetSpec(args.spans, args.seed, args.days), args.out)
    elapsed = time.perf_counter() - started
    print(
        f"wrote {counts['spans']:,} spans ({counts['rollouts']:,} rollouts) in {counts['files']} files "
        f"under {args.out / 'spans'} in {elapsed:.1f} s ({counts['spans'] / elapsed:,.0f} spans/s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
