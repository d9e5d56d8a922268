"""Normalization of what instrumentations emit into the spans table's promoted columns.

Every convention lands in the same columns. Where one span carries several (OpenInference's Pydantic
AI processor adds its attributes to Pydantic AI's own GenAI ones), the GenAI conventions win, then
OpenInference, then Traceloop's pre-0.55 flattened form, then message events. What each column reads:

* ``span_type``: ``openinference.span.kind`` (LLM, EMBEDDING, TOOL, AGENT; a CHAIN naming an agent is
  an agent), ``gen_ai.operation.name``, ``traceloop.span.kind``, ``gen_ai.tool.name``.
* ``input_messages`` / ``output_messages``: ``gen_ai.system_instructions`` + ``gen_ai.input.messages``
  and ``gen_ai.output.messages`` (parts); OpenInference ``llm.input_messages.{i}.message.*`` /
  ``llm.output_messages.{i}.message.*``; Traceloop ``gen_ai.prompt.{i}.*`` / ``gen_ai.completion.{i}.*``;
  GenAI message events (older Pydantic AI's ``events`` attribute, or span events).
* tokens: ``gen_ai.usage.input_tokens`` / ``output_tokens`` (or ``prompt_tokens`` / ``completion_tokens``);
  ``llm.token_count.prompt`` / ``completion``.
* models: ``gen_ai.request.model`` / ``gen_ai.response.model``; ``llm.request.model_name`` /
  ``llm.response.model_name``, the invocation parameters' ``model``, ``llm.model_name``.
* ``response_id``: ``gen_ai.response.id``; the ``id`` opening OpenInference's JSON ``output.value``.
* ``finish_reason``: ``gen_ai.response.finish_reasons``, ``llm.finish_reason``,
  ``gen_ai.completion.0.finish_reason``, in OpenAI's words (``tool_call`` becomes ``tool_calls``).
* sampling: ``gen_ai.request.temperature`` / ``top_p`` / ``top_k``; ``llm.invocation_parameters``.
* ``model_version``: ``tracelearn.model.version`` (the gateway), else the response's system fingerprint
  (``gen_ai.openai.response.system_fingerprint``, ``openai.response.system_fingerprint``).
* ``agent_name``: ``gen_ai.agent.name``, Traceloop's agent entity, OpenInference's ``agent.name`` and
  ``graph.node.id``, LangGraph nodes, inherited names; ``tool_name``: ``gen_ai.tool.name``, ``tool.name``.

Messages go through the one message codec, ``tracelearn.schemas.messages``; single attribute values
become column values in ``attribute_values``. A span of no known
convention is typed ``other`` and keeps its raw attributes. Every function here is pure and tolerant:
malformed input yields ``None`` (and, for messages, a problem named in ``messages_problem``) rather
than an exception, because a span is never rejected for having odd attributes.
"""

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from tracelearn.collector.attribute_values import (
    as_float,
    as_int,
    attribute_text,
    first_of,
    str_or_none,
)
from tracelearn.schemas import messages as mc
from tracelearn.schemas import semconv as sc

LLM_OPERATIONS = frozenset({"chat", "text_completion", "completion", "generate_content", "embeddings"})
AGENT_OPERATIONS = frozenset({"invoke_agent", "create_agent"})
OPENINFERENCE_TYPES = {"LLM": sc.TYPE_LLM, "EMBEDDING": sc.TYPE_LLM, "TOOL": sc.TYPE_TOOL, "AGENT": sc.TYPE_AGENT}
# The GenAI conventions' finish reasons in OpenAI's words, the words of the messages columns.
FINISH_REASONS = {"tool_call": "tool_calls", "tool_calls": "tool_calls", "function_call": "tool_calls"}
OPERATION_OF_TYPE = {sc.TYPE_TOOL: "execute_tool", sc.TYPE_AGENT: "invoke_agent"}
FLATTENED_FINISH_REASON = f"{sc.GEN_AI_COMPLETION_PREFIX}0.finish_reason"


# --- Span type, agent, tool -------------------------------------------------------------------------


def span_type(name: str, attributes: Mapping[str, Any]) -> str:
    """Classify a span as llm, tool, agent, reward, annotation, message, rollout, token_ids or other."""
    declared = attributes.get(sc.SPAN_TYPE)
    if isinstance(declared, str):
        return declared
    openinference = attributes.get(sc.OPENINFERENCE_SPAN_KIND)
    if openinference is not None:
        mapped = OPENINFERENCE_TYPES.get(openinference) if type(openinference) is str else None
        if mapped is not None:
            return mapped
        # A CHAIN that names an agent (a graph node, a crew member) is that agent's turn.
        return sc.TYPE_AGENT if openinference_agent(name, attributes) is not None else sc.TYPE_OTHER
    operation = attributes.get(sc.GEN_AI_OPERATION_NAME)
    traceloop_kind = attributes.get(sc.TRACELOOP_SPAN_KIND)
    # Values looked up in sets must be hashable: attributes over OTLP may be lists or maps.
    if operation is not None and type(operation) is not str:
        operation = None
    if traceloop_kind is not None and type(traceloop_kind) is not str:
        traceloop_kind = None
    if operation == "execute_tool" or traceloop_kind == sc.TRACELOOP_TOOL_KIND:
        return sc.TYPE_TOOL
    # Traceloop's CrewAI marks its task spans invoke_agent too; the agent is the span around them.
    if traceloop_kind in sc.TRACELOOP_AGENT_KINDS or (operation in AGENT_OPERATIONS and traceloop_kind != "task"):
        return sc.TYPE_AGENT
    if operation in LLM_OPERATIONS or sc.GEN_AI_REQUEST_MODEL in attributes:
        return sc.TYPE_LLM
    if sc.TRACELOOP_LLM_REQUEST_TYPE in attributes:
        return sc.TYPE_LLM
    if operation is None and sc.GEN_AI_TOOL_NAME in attributes:  # older Pydantic AI's "running tool"
        return sc.TYPE_TOOL
    if operation is None and name == "agent run" and sc.PYDANTIC_AI_AGENT_NAME in attributes:
        return sc.TYPE_AGENT
    return sc.TYPE_OTHER


def _text_attribute(attributes: Mapping[str, Any], key: str) -> str | None:
    value = attributes.get(key)
    return value if isinstance(value, str) and value else None


def openinference_agent(name: str, attributes: Mapping[str, Any]) -> str | None:
    """The agent an OpenInference span names: ``agent.name``, a graph node (OpenAI Agents, CrewAI),
    LangChain's agent or else the LangGraph node in its metadata, or smolagents' ``<agent>.run`` span name."""
    named = _text_attribute(attributes, sc.OPENINFERENCE_AGENT_NAME) or _text_attribute(
        attributes, sc.OPENINFERENCE_GRAPH_NODE_ID
    )
    if named is not None:
        return named
    metadata = attributes.get(sc.OPENINFERENCE_METADATA)
    if isinstance(metadata, str) and ('"lc_agent_name"' in metadata or '"langgraph_node"' in metadata):
        try:
            parsed = mc.parse_json(metadata)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            # LangChain's create_agent names its agent; its graph's nodes (model, tools) are steps.
            for key in ("lc_agent_name", "langgraph_node"):
                named = parsed.get(key)
                if isinstance(named, str) and named:
                    return named
    if attributes.get(sc.OPENINFERENCE_SPAN_KIND) == "AGENT" and name.endswith(".run") and len(name) > 4:
        return name[:-4]
    return None


def agent_name_of(attributes: Mapping[str, Any], name: str = "") -> str | None:
    """The agent a span belongs to.

    In order: the user's explicit ``tracelearn.agent()`` / ``rollout(agent=)`` (baggage), the span's own
    ``gen_ai.agent.name``, Traceloop agent entity or OpenInference agent (``openinference_agent``), the
    LangChain agent (``create_agent``) or else the LangGraph node it ran in, the name inherited from its
    ancestors at start, older Pydantic AI's ``agent_name``, and last the span's own Traceloop workflow name.
    """
    for key in (sc.AGENT_NAME, sc.GEN_AI_AGENT_NAME):
        value = attributes.get(key)
        if isinstance(value, str) and value:
            return value
    kind = attributes.get(sc.TRACELOOP_SPAN_KIND)
    entity = attributes.get(sc.TRACELOOP_ENTITY_NAME)
    if kind == "agent" and isinstance(entity, str) and entity:
        return entity
    if sc.OPENINFERENCE_SPAN_KIND in attributes:
        named = openinference_agent(name, attributes)
        if named is not None:
            return named
    for key in (sc.LANGCHAIN_AGENT_NAME, sc.LANGGRAPH_NODE, sc.AGENT_INHERITED, sc.PYDANTIC_AI_AGENT_NAME):
        value = attributes.get(key)
        if isinstance(value, str) and value:
            return value
    if kind == "workflow" and isinstance(entity, str) and entity:
        return entity
    return None


def tool_name_of(name: str, attributes: Mapping[str, Any]) -> str | None:
    """Tool name of a tool span: gen_ai.tool.name, OpenInference's tool.name, Traceloop's entity, or the span name."""
    for key in (sc.GEN_AI_TOOL_NAME, sc.OPENINFERENCE_TOOL_NAME, sc.TRACELOOP_ENTITY_NAME):
        value = attributes.get(key)
        if isinstance(value, str) and value:
            return value
    return name.removesuffix(".tool")


def operation_name_of(kind: str, attributes: Mapping[str, Any]) -> str | None:
    """``gen_ai.operation.name``, else the operation the span's type and convention imply."""
    operation = attributes.get(sc.GEN_AI_OPERATION_NAME)
    if operation is not None:
        return operation if isinstance(operation, str) else attribute_text(operation)
    if kind == sc.TYPE_LLM:
        openinference = attributes.get(sc.OPENINFERENCE_SPAN_KIND)
        if openinference == "EMBEDDING":
            return "embeddings"
        request_type = attributes.get(sc.TRACELOOP_LLM_REQUEST_TYPE)
        if request_type == "completion" or (openinference is not None and sc.OPENINFERENCE_PROMPTS in attributes):
            return "text_completion"
        return "chat" if openinference is not None or request_type == "chat" else None
    return OPERATION_OF_TYPE.get(kind)


# --- LLM calls --------------------------------------------------------------------------------------


class LLMColumns(NamedTuple):
    """The promoted columns of one LLM call, from whichever convention its span uses."""

    input_messages: str | None
    output_messages: str | None
    input_tokens: int | None
    output_tokens: int | None
    request_model: str | None
    response_model: str | None
    response_id: str | None
    finish_reason: str | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    model_version: str | None
    messages_problem: str | None


SpanEvents = Sequence[tuple[str, int, Mapping[str, Any]]]


def _from_events(attributes: Mapping[str, Any], events: SpanEvents) -> tuple[mc.Decoded, mc.Decoded, str]:
    """Messages carried as GenAI events: Pydantic AI's ``events`` attribute, else the span's events."""
    packed = attributes.get(sc.GEN_AI_EVENTS_ATTRIBUTE)
    if isinstance(packed, str) and packed.startswith("["):
        inputs, outputs = mc.events_attribute_to_openai(packed)
        if inputs.messages is not None or outputs.messages is not None:
            return inputs, outputs, sc.GEN_AI_EVENTS_ATTRIBUTE
    if events:
        inputs, outputs = mc.event_messages_to_openai((name, body) for name, _, body in events)
        return inputs, outputs, "span events"
    return mc.ABSENT, mc.ABSENT, ""


def input_messages(attributes: Mapping[str, Any], events: SpanEvents = ()) -> mc.Decoded:
    """The prompt messages of an LLM span, whichever encoding the instrumentation used."""
    raw = attributes.get(sc.GEN_AI_INPUT_MESSAGES)
    if raw is not None:
        decoded = mc.parts_messages_to_openai(raw)
        system = attributes.get(sc.GEN_AI_SYSTEM_INSTRUCTIONS)
        if system is not None and decoded.messages is not None:
            # Newer conventions keep the system prompt apart from the messages.
            instructions = mc.system_instructions_to_openai(system)
            return mc.Decoded((instructions.messages or []) + decoded.messages, decoded.problem or instructions.problem)
        return decoded
    if sc.OPENINFERENCE_SPAN_KIND in attributes:
        decoded = mc.openinference_messages_to_openai(attributes, sc.OPENINFERENCE_INPUT_MESSAGES_PREFIX)
        if decoded.messages is not None:
            return decoded
    decoded = mc.flattened_messages_to_openai(attributes, sc.GEN_AI_PROMPT_PREFIX)
    if decoded.messages is not None:
        return decoded
    return _from_events(attributes, events)[0]


def output_messages(attributes: Mapping[str, Any], events: SpanEvents = ()) -> mc.Decoded:
    """The response messages of an LLM span, whichever encoding the instrumentation used."""
    raw = attributes.get(sc.GEN_AI_OUTPUT_MESSAGES)
    if raw is not None:
        return mc.parts_messages_to_openai(raw)
    if sc.OPENINFERENCE_SPAN_KIND in attributes:
        decoded = mc.openinference_messages_to_openai(attributes, sc.OPENINFERENCE_OUTPUT_MESSAGES_PREFIX)
        if decoded.messages is not None:
            return decoded
    decoded = mc.flattened_messages_to_openai(attributes, sc.GEN_AI_COMPLETION_PREFIX)
    if decoded.messages is not None:
        return decoded
    return _from_events(attributes, events)[1]


def _messages_source(attributes: Mapping[str, Any], genai_key: str, openinference_prefix: str) -> str:
    """The attribute a messages problem is reported under (for ``messages_problem``)."""
    if genai_key in attributes:
        return genai_key
    if sc.GEN_AI_EVENTS_ATTRIBUTE in attributes:
        return sc.GEN_AI_EVENTS_ATTRIBUTE
    return openinference_prefix.rstrip(".") if sc.OPENINFERENCE_SPAN_KIND in attributes else "span events"


def _openinference_response_id(attributes: Mapping[str, Any]) -> str | None:
    """The response id in OpenInference's ``output.value``: the provider's JSON response opens with it
    (``{"id": ...``); LangChain's ``LLMResult`` carries it in ``llm_output``, after the generations.

    Read from the text, not parsed: the value holds the whole response, logprobs included.
    """
    output = attributes.get(sc.OPENINFERENCE_OUTPUT_VALUE)
    if not isinstance(output, str):
        return None
    if output.startswith('{"id":"'):
        return _quoted_at(output, 7)
    if output.startswith('{"generations"'):
        llm_output = output.rfind('"llm_output": {')
        start = output.find('"id": "', llm_output) if llm_output >= 0 else -1
        if start >= 0:
            return _quoted_at(output, start + 7)
    return None


def _quoted_at(text: str, start: int) -> str | None:
    """The string that starts at ``start`` and ends at the next double quote (None when empty or open)."""
    end = text.find('"', start)
    return text[start:end] if end > start else None


def _invocation_parameters(attributes: Mapping[str, Any]) -> Mapping[str, Any]:
    raw = attributes.get(sc.OPENINFERENCE_INVOCATION_PARAMETERS)
    if not isinstance(raw, str) or not raw:
        return {}
    try:
        parsed = mc.parse_json(raw)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


# What the gateway records when neither the server's header nor a fingerprint said which weights answered.
_UNKNOWN_VERSION = "unknown"


def model_version_of(attributes: Mapping[str, Any]) -> str | None:
    """Which weights answered the call: ``tracelearn.model.version``, else the first system fingerprint
    (``sc.OPENAI_SYSTEM_FINGERPRINTS``); ``None`` when neither says (the gateway's ``unknown`` included)."""
    for key in (sc.MODEL_VERSION, *sc.OPENAI_SYSTEM_FINGERPRINTS):
        value = attributes.get(key)
        if isinstance(value, str) and value and value != _UNKNOWN_VERSION:
            return value
    return None


def finish_reason_of(value: Any) -> str | None:
    """The first finish reason, in OpenAI's words (``tool_call`` of the GenAI conventions is ``tool_calls``);
    the list may come as JSON text (attributes re-read from the spans table, which stores them so)."""
    if isinstance(value, str) and value.startswith("["):
        with contextlib.suppress(ValueError):
            value = mc.parse_json(value)
    first = first_of(value)
    return None if first is None else FINISH_REASONS.get(first, first)


def llm_columns(attributes: Mapping[str, Any], events: SpanEvents = ()) -> LLMColumns:
    """Every promoted column of an LLM call, whichever convention (or mix) its span uses."""
    get = attributes.get
    inputs, input_problem = input_messages(attributes, events)
    outputs, output_problem = output_messages(attributes, events)
    problem = None
    if input_problem is not None or output_problem is not None:  # rare: name where each came from
        problem = "; ".join(
            f"{_messages_source(attributes, key, prefix)}: {found}"
            for key, prefix, found in (
                (sc.GEN_AI_INPUT_MESSAGES, sc.OPENINFERENCE_INPUT_MESSAGES_PREFIX, input_problem),
                (sc.GEN_AI_OUTPUT_MESSAGES, sc.OPENINFERENCE_OUTPUT_MESSAGES_PREFIX, output_problem),
            )
            if found is not None
        )
    input_tokens = get(sc.GEN_AI_USAGE_INPUT_TOKENS, get(sc.GEN_AI_USAGE_PROMPT_TOKENS_OLD))
    output_tokens = get(sc.GEN_AI_USAGE_OUTPUT_TOKENS, get(sc.GEN_AI_USAGE_COMPLETION_TOKENS_OLD))
    request_model = get(sc.GEN_AI_REQUEST_MODEL)
    response_model = get(sc.GEN_AI_RESPONSE_MODEL)
    response_id = get(sc.GEN_AI_RESPONSE_ID)
    finish = get(sc.GEN_AI_RESPONSE_FINISH_REASONS, get(FLATTENED_FINISH_REASON))
    temperature = get(sc.GEN_AI_REQUEST_TEMPERATURE)
    top_p = get(sc.GEN_AI_REQUEST_TOP_P)
    top_k = get(sc.GEN_AI_REQUEST_TOP_K)
    if sc.OPENINFERENCE_SPAN_KIND in attributes:
        parameters = _invocation_parameters(attributes)
        model_name = get(sc.OPENINFERENCE_MODEL_NAME)
        if input_tokens is None:
            input_tokens = get(sc.OPENINFERENCE_PROMPT_TOKENS)
        if output_tokens is None:
            output_tokens = get(sc.OPENINFERENCE_COMPLETION_TOKENS)
        if request_model is None:
            request_model = get(sc.OPENINFERENCE_REQUEST_MODEL_NAME, parameters.get("model", model_name))
        if response_model is None:
            response_model = get(sc.OPENINFERENCE_RESPONSE_MODEL_NAME, model_name)
        if response_id is None:
            response_id = _openinference_response_id(attributes)
        if finish is None:
            finish = get(sc.OPENINFERENCE_FINISH_REASON)
        if temperature is None:
            temperature = parameters.get("temperature")
        if top_p is None:
            top_p = parameters.get("top_p")
        if top_k is None:
            top_k = parameters.get("top_k")
    return LLMColumns(
        None if inputs is None else mc.compact_json(inputs),
        None if outputs is None else mc.compact_json(outputs),
        as_int(input_tokens),
        as_int(output_tokens),
        str_or_none(request_model),
        str_or_none(response_model),
        str_or_none(response_id),
        finish_reason_of(finish),
        as_float(temperature),
        as_float(top_p),
        as_int(top_k),
        model_version_of(attributes),
        problem,
    )
