"""The Arrow schemas of tracelearn's tables and their current versions.

Each field carries a ``description`` in its Arrow field metadata; ``docs/schemas.md`` is generated
from these definitions (``python -m tracelearn.schemas.docs``), so the documentation cannot drift.
Bump a table's version whenever its schema changes, and register a migration in
``tracelearn.schemas.migrations`` that lifts files of the old version to the new one.
"""

from dataclasses import dataclass

import pyarrow as pa

SCHEMA_VERSION_KEY = b"tracelearn.schema_version"
TABLE_NAME_KEY = b"tracelearn.table"

STRING_MAP = pa.map_(pa.string(), pa.string())
TIMESTAMP = pa.timestamp("ns", tz="UTC")
TOKEN_IDS = pa.list_(pa.int32())
LOGPROBS = pa.list_(pa.float32())


def _field(name: str, type_: pa.DataType, description: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={b"description": description.encode()})


@dataclass(frozen=True)
class TableSpec:
    """A table: its name, current version, schema and hive partition columns."""

    name: str
    version: int
    schema: pa.Schema
    partition_columns: tuple[str, ...] = ()
    description: str = ""

    def schema_with_metadata(self) -> pa.Schema:
        """The schema carrying the version and table name as Parquet key-value metadata."""
        return self.schema.with_metadata(
            {SCHEMA_VERSION_KEY: str(self.version).encode(), TABLE_NAME_KEY: self.name.encode()}
        )


SPAN_EVENT = pa.struct(
    [
        pa.field("name", pa.string()),
        pa.field("time", TIMESTAMP),
        pa.field("attributes", STRING_MAP),
    ]
)
SPAN_LINK = pa.struct(
    [
        pa.field("trace_id", pa.string()),
        pa.field("span_id", pa.string()),
        pa.field("attributes", STRING_MAP),
    ]
)

SPANS = TableSpec(
    name="spans",
    version=3,
    partition_columns=("date", "service"),
    description=(
        "One row per OpenTelemetry span. Written by the in-process exporter and the collector sidecar, "
        "partitioned `date=YYYY-MM-DD/service=NAME/` (the span's start date in UTC and its service.name). "
        "Attribute values that are not strings are stored as JSON text."
    ),
    schema=pa.schema(
        [
            _field("trace_id", pa.string(), "Trace id, 32 lowercase hex characters.", nullable=False),
            _field("span_id", pa.string(), "Span id, 16 lowercase hex characters.", nullable=False),
            _field("parent_span_id", pa.string(), "Parent span id (16 hex), null for a root span."),
            _field("name", pa.string(), "Span name.", nullable=False),
            _field("kind", pa.string(), "INTERNAL, SERVER, CLIENT, PRODUCER or CONSUMER."),
            _field("start_time", TIMESTAMP, "Span start (UTC).", nullable=False),
            _field("end_time", TIMESTAMP, "Span end (UTC).", nullable=False),
            _field("duration_ns", pa.int64(), "end_time - start_time in nanoseconds."),
            _field("status_code", pa.string(), "UNSET, OK or ERROR."),
            _field("status_message", pa.string(), "Status description, if any."),
            _field("service_name", pa.string(), "Resource attribute service.name."),
            _field("scope_name", pa.string(), "Instrumentation scope that created the span."),
            _field("resource_attributes", STRING_MAP, "All resource attributes."),
            _field("attributes", STRING_MAP, "All span attributes, raw (nothing is dropped)."),
            _field("events", pa.list_(SPAN_EVENT), "Span events: name, time, attributes."),
            _field("links", pa.list_(SPAN_LINK), "Span links: trace_id, span_id, attributes."),
            _field(
                "span_type",
                pa.string(),
                "llm, tool, agent, reward, annotation, message, rollout, "
                "token_ids or other (derived from the attributes).",
            ),
            _field(
                "rollout_id",
                pa.string(),
                "Rollout id: from tracelearn.rollout() or baggage, else the trace id (one trace is one rollout).",
            ),
            _field("attempt_id", pa.string(), "Attempt id within the rollout, if set."),
            _field(
                "task_id",
                pa.string(),
                "Task id if set explicitly; otherwise null here and "
                "derived per rollout by the pipeline (hash of the first user message).",
            ),
            _field("group_id", pa.string(), "Rollout group (for example the task family), if set."),
            _field(
                "agent_name",
                pa.string(),
                "Agent that made the call: gen_ai.agent.name, "
                "tracelearn.agent.name or the framework's entity name, inherited from ancestors.",
            ),
            _field(
                "operation_name",
                pa.string(),
                "gen_ai.operation.name (chat, text_completion, embeddings, execute_tool, invoke_agent, ...), "
                "else the operation the span's type implies.",
            ),
            _field("request_model", pa.string(), "gen_ai.request.model (OpenInference: llm.request.model_name)."),
            _field("response_model", pa.string(), "gen_ai.response.model (OpenInference: llm.model_name)."),
            _field("response_id", pa.string(), "gen_ai.response.id (joins token ids to the call)."),
            _field(
                "finish_reason",
                pa.string(),
                "First of gen_ai.response.finish_reasons, in OpenAI's words (stop, length, tool_calls, ...).",
            ),
            _field(
                "input_messages",
                pa.string(),
                "Prompt messages as JSON text, whatever the convention captured: "
                '[{"role": ..., "content": text or null, "tool_calls"?: [{"id", "type": "function", '
                '"function": {"name", "arguments": JSON text}}], "tool_call_id"?: ..., "reasoning_content"?: ...}] '
                "(tracelearn.schemas.messages).",
            ),
            _field("output_messages", pa.string(), "Response messages, same JSON shape."),
            _field("input_tokens", pa.int64(), "gen_ai.usage.input_tokens (OpenInference: llm.token_count.prompt)."),
            _field(
                "output_tokens", pa.int64(), "gen_ai.usage.output_tokens (OpenInference: llm.token_count.completion)."
            ),
            _field(
                "request_temperature",
                pa.float64(),
                "Sampling temperature requested (gen_ai.request.temperature, OpenInference invocation parameters).",
            ),
            _field("request_top_p", pa.float64(), "Nucleus sampling top_p requested."),
            _field("request_top_k", pa.int64(), "Top-k sampling requested."),
            _field(
                "model_version",
                pa.string(),
                "Which weights answered the call: tracelearn.model.version (the gateway, the token-id hook), else "
                "the response's system_fingerprint (Traceloop: gen_ai.openai.response.system_fingerprint, the "
                "official GenAI instrumentation: openai.response.system_fingerprint); tracelearn serve reports its "
                "model version there (calc-policy@4+b1c5bf429df1). Null when unknown.",
            ),
            _field(
                "messages_problem",
                pa.string(),
                "What could not be read of an LLM call's messages, as '<attribute>: <problem>' (not JSON, "
                "truncated JSON, not a list of messages, unreadable message, unreadable part); null when "
                "everything was read. The call keeps the messages that could be read.",
            ),
            _field("prompt_token_ids", TOKEN_IDS, "Prompt token ids as the model server tokenized them."),
            _field("response_token_ids", TOKEN_IDS, "Response token ids as the model server generated them."),
            _field("response_logprobs", LOGPROBS, "Log-probability of each response token under the serving policy."),
            _field(
                "token_ids_status",
                pa.string(),
                "server, not_requested, rejected_by_server or "
                "missing_in_response, or not_captured when no token-id hook saw the call (null for non-LLM spans).",
            ),
            _field("tool_name", pa.string(), "Tool name for tool spans."),
            _field("reward", pa.float64(), "Reward value, for reward spans."),
            _field("reward_name", pa.string(), "Reward name, for reward spans."),
            _field("reward_is_primary", pa.bool_(), "Whether this reward is the rollout's primary one."),
        ]
    ),
)

FEEDBACK = TableSpec(
    name="feedback",
    version=1,
    partition_columns=("date",),
    description="Late rewards that arrive after the run (production thumbs-up, graders), joined by the "
    "pipeline on trace_id or rollout_id.",
    schema=pa.schema(
        [
            _field("feedback_id", pa.string(), "Unique id of this feedback item (de-duplication key).", nullable=False),
            _field("trace_id", pa.string(), "Trace the feedback is about (32 hex), or null."),
            _field("rollout_id", pa.string(), "Rollout the feedback is about, or null."),
            _field("name", pa.string(), "Reward name.", nullable=False),
            _field("value", pa.float64(), "Reward value (finite).", nullable=False),
            _field("time", TIMESTAMP, "When the feedback was given (UTC).", nullable=False),
            _field("source", pa.string(), "Who gave it (user, grader name, ...)."),
            _field("attributes", STRING_MAP, "Free-form extra attributes."),
        ]
    ),
)

ROLLOUTS = TableSpec(
    name="rollouts",
    version=2,
    description="One row per rollout (by default one trace, or one conversation of an agent that opens no span "
    "of its own), built from the spans by the pipeline.",
    schema=pa.schema(
        [
            _field("rollout_id", pa.string(), "Rollout id.", nullable=False),
            _field("attempt_id", pa.string(), "Attempt id, if any."),
            _field("trace_ids", pa.list_(pa.string()), "Traces that make up the rollout."),
            _field(
                "identity",
                pa.string(),
                "The rule that made the rollout: explicit (a rollout id from tracelearn.rollout() or baggage), "
                "trace (one trace with a root span that is not an LLM call), conversation (LLM calls without a "
                "common trace, joined because each one's input carries on an earlier one's input and output) or "
                "sequence (joined by process, thread, first user message and time, after a rewritten prompt).",
            ),
            _field("task_id", pa.string(), "Task id (explicit, or hash of the first user message)."),
            _field("group_id", pa.string(), "Group key for GRPO advantages."),
            _field("service_name", pa.string(), "service.name of the agent process."),
            _field("agents", pa.list_(pa.string()), "Agent names seen in the rollout."),
            _field("start_time", TIMESTAMP, "First span start."),
            _field("end_time", TIMESTAMP, "Last span end."),
            _field(
                "status",
                pa.string(),
                "error (any span ended in ERROR), incomplete (spans whose parent is missing and no root) or ok.",
            ),
            _field("error_message", pa.string(), "Status message of the first span that ended in ERROR."),
            _field("final_reward", pa.float64(), "Primary reward, null if none."),
            _field("reward_name", pa.string(), "Name of the primary reward."),
            _field("rewards", pa.map_(pa.string(), pa.float64()), "All named rewards."),
            _field("n_spans", pa.int64(), "Number of spans (nested LLM spans of one call count once)."),
            _field("n_llm_calls", pa.int64(), "Number of LLM calls (nested LLM spans of one call count once)."),
            _field("n_tool_calls", pa.int64(), "Number of tool calls."),
            _field("n_errors", pa.int64(), "Number of spans with status ERROR."),
            _field("input_tokens", pa.int64(), "Sum of input tokens over LLM calls."),
            _field("output_tokens", pa.int64(), "Sum of output tokens over LLM calls."),
        ]
    ),
)

TRANSITIONS = TableSpec(
    name="transitions",
    version=2,
    description="One row per LLM call chosen for training, with credited reward and advantage.",
    schema=pa.schema(
        [
            _field("rollout_id", pa.string(), "Rollout id.", nullable=False),
            _field("attempt_id", pa.string(), "Attempt id, if any."),
            _field("task_id", pa.string(), "Task id."),
            _field("group_id", pa.string(), "Group key used for advantages."),
            _field("step_index", pa.int32(), "Order of the call within the rollout (0-based).", nullable=False),
            _field("agent_name", pa.string(), "Agent that made the call."),
            _field("model", pa.string(), "Model that answered."),
            _field("prompt_messages", pa.string(), "Prompt messages (JSON text)."),
            _field("response", pa.string(), "Response messages (JSON text)."),
            _field("prompt_token_ids", TOKEN_IDS, "Prompt token ids."),
            _field("response_token_ids", TOKEN_IDS, "Response token ids."),
            _field("response_logprobs", LOGPROBS, "Logprobs of the response tokens at capture time."),
            _field("token_ids_source", pa.string(), "server (as generated) or retokenized."),
            _field(
                "temperature",
                pa.float64(),
                "Sampling temperature the call was made with (the span's request_temperature); null when "
                "unknown. The trainer divides the logits by it, as the server did before sampling.",
            ),
            _field("top_p", pa.float64(), "Nucleus sampling top_p of the call; null when unknown (or not set)."),
            _field("top_k", pa.int64(), "Top-k of the call; null when unknown (or not set)."),
            _field(
                "model_version",
                pa.string(),
                "Version of the weights that generated the response (the span's model_version); null when "
                "unknown. The trainer weighs or drops transitions of another version than the one it starts from.",
            ),
            _field("rewards", pa.map_(pa.string(), pa.float64()), "Raw named rewards of the rollout."),
            _field("reward", pa.float64(), "Primary raw reward."),
            _field("credited_reward", pa.float64(), "Reward credited to this step."),
            _field("advantage", pa.float64(), "Advantage used by the policy-gradient loss."),
            _field("loss_mask", pa.list_(pa.int8()), "1 where the loss applies, per response token."),
            _field("trace_id", pa.string(), "Provenance: trace id of the LLM call."),
            _field("span_id", pa.string(), "Provenance: span id of the LLM call."),
            _field("pipeline_config_hash", pa.string(), "Provenance: hash of the pipeline config."),
        ]
    ),
)

TABLES: dict[str, TableSpec] = {spec.name: spec for spec in (SPANS, FEEDBACK, ROLLOUTS, TRANSITIONS)}


def table_spec(name: str) -> TableSpec:
    """The spec of table ``name``; raises ``KeyError`` naming the known tables."""
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"unknown table {name!r}; known tables: {', '.join(sorted(TABLES))}") from None
