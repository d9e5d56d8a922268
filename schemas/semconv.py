"""Attribute names: the ones tracelearn writes, and the ``gen_ai.*`` / framework ones it reads.

Everything that names a span attribute, a baggage key or a resource attribute is defined here once,
so the capture side, the collector and the pipelines cannot disagree on a spelling.
"""

from typing import Final

# --- Our own attributes (written by tracelearn.instrumentation) -------------------------------------
ROLLOUT_ID: Final = "tracelearn.rollout.id"
ATTEMPT_ID: Final = "tracelearn.rollout.attempt_id"
TASK_ID: Final = "tracelearn.task.id"
GROUP_ID: Final = "tracelearn.rollout.group"
AGENT_NAME: Final = "tracelearn.agent.name"
# Agent resolved from the span's ancestors at start (frameworks name agents on outer spans).
AGENT_INHERITED: Final = "tracelearn.agent.inherited"
SPAN_TYPE: Final = "tracelearn.span.type"

REWARD_NAME: Final = "tracelearn.reward.name"
REWARD_VALUE: Final = "tracelearn.reward.value"
REWARD_PRIMARY: Final = "tracelearn.reward.primary"
ANNOTATION_NAME: Final = "tracelearn.annotation.name"
ANNOTATION_VALUE: Final = "tracelearn.annotation.value"
MESSAGE_ROLE: Final = "tracelearn.message.role"
MESSAGE_CONTENT: Final = "tracelearn.message.content"
METADATA_PREFIX: Final = "tracelearn.metadata."

# Token fidelity: what the model server generated, recorded on the LLM call's span.
PROMPT_TOKEN_IDS: Final = "tracelearn.llm.prompt_token_ids"
RESPONSE_TOKEN_IDS: Final = "tracelearn.llm.response_token_ids"
RESPONSE_LOGPROBS: Final = "tracelearn.llm.response_logprobs"
TOKEN_IDS_STATUS: Final = "tracelearn.llm.token_ids_status"
# Set when a response had several choices (n > 1): the ids and logprobs recorded are choice 0's.
RESPONSE_CHOICE_COUNT: Final = "tracelearn.llm.response_choice_count"
MODEL_VERSION: Final = "tracelearn.model.version"
# Written by the gateway (tracelearn.serving.gateway): where a call went and which registry prompt it got.
GATEWAY_UPSTREAM: Final = "tracelearn.gateway.upstream"
PROMPT_REF: Final = "tracelearn.prompt.ref"  # the prompt version substituted, name@N
PROMPT_REQUESTED: Final = "tracelearn.prompt.requested"  # the reference configured, e.g. name@production

# Baggage keys that carry rollout identity across threads, tasks and (with W3C propagation) processes.
BAGGAGE_KEYS: Final = (ROLLOUT_ID, ATTEMPT_ID, TASK_ID, GROUP_ID, AGENT_NAME)

# Span names of our own spans.
SPAN_ROLLOUT: Final = "tracelearn.rollout"
SPAN_REWARD: Final = "tracelearn.reward"
SPAN_ANNOTATION: Final = "tracelearn.annotation"
SPAN_MESSAGE: Final = "tracelearn.message"
SPAN_TOKEN_IDS: Final = "tracelearn.token_ids"

# Values of SPAN_TYPE / the spans table's ``span_type`` column.
TYPE_ROLLOUT: Final = "rollout"
TYPE_LLM: Final = "llm"
TYPE_TOOL: Final = "tool"
TYPE_AGENT: Final = "agent"
TYPE_REWARD: Final = "reward"
TYPE_ANNOTATION: Final = "annotation"
TYPE_MESSAGE: Final = "message"
TYPE_TOKEN_IDS: Final = "token_ids"
TYPE_OTHER: Final = "other"

# Values of TOKEN_IDS_STATUS.
TOKEN_IDS_FROM_SERVER: Final = "server"
TOKEN_IDS_NOT_REQUESTED: Final = "not_requested"
TOKEN_IDS_REJECTED: Final = "rejected_by_server"
TOKEN_IDS_MISSING: Final = "missing_in_response"
# Set by the collector on LLM spans that no token-id hook saw (our instrumentor was not active).
TOKEN_IDS_NOT_CAPTURED: Final = "not_captured"

# --- OpenTelemetry resource / GenAI semantic conventions we read -------------------------------------
SERVICE_NAME: Final = "service.name"
# Put on every span at start by our span processor: the process and thread that made the span, what
# joins an agent's LLM calls into rollouts when the agent opens no span of its own.
PROCESS_PID: Final = "process.pid"
THREAD_ID: Final = "thread.id"
GEN_AI_OPERATION_NAME: Final = "gen_ai.operation.name"
GEN_AI_SYSTEM: Final = "gen_ai.system"
GEN_AI_PROVIDER_NAME: Final = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL: Final = "gen_ai.response.model"
GEN_AI_RESPONSE_ID: Final = "gen_ai.response.id"
GEN_AI_RESPONSE_FINISH_REASONS: Final = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
GEN_AI_USAGE_PROMPT_TOKENS_OLD: Final = "gen_ai.usage.prompt_tokens"
GEN_AI_USAGE_COMPLETION_TOKENS_OLD: Final = "gen_ai.usage.completion_tokens"
GEN_AI_INPUT_MESSAGES: Final = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES: Final = "gen_ai.output.messages"
GEN_AI_SYSTEM_INSTRUCTIONS: Final = "gen_ai.system_instructions"
GEN_AI_AGENT_NAME: Final = "gen_ai.agent.name"
GEN_AI_TOOL_NAME: Final = "gen_ai.tool.name"
# Traceloop's pre-0.55 flattened form: gen_ai.prompt.{i}.role / .content, gen_ai.completion.{i}.*
GEN_AI_PROMPT_PREFIX: Final = "gen_ai.prompt."
GEN_AI_COMPLETION_PREFIX: Final = "gen_ai.completion."
GEN_AI_REQUEST_TEMPERATURE: Final = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P: Final = "gen_ai.request.top_p"
GEN_AI_REQUEST_TOP_K: Final = "gen_ai.request.top_k"
# Which weights answered: OpenAI's system_fingerprint, as Traceloop 0.62 and the official instrumentation's
# older releases record it, as its newer releases do, and as the openai semconv_ai package spells it.
OPENAI_SYSTEM_FINGERPRINTS: Final = (
    "gen_ai.openai.response.system_fingerprint",
    "openai.response.system_fingerprint",
    "gen_ai.openai.system_fingerprint",
)
# What the token-id hook records from the response body (the current conventions' name).
OPENAI_RESPONSE_SYSTEM_FINGERPRINT: Final = "openai.response.system_fingerprint"
# Message events of conventions 1.26-1.36 (names in tracelearn.schemas.messages) as span events, or, in
# older Pydantic AI (event mode "attributes"), as one span attribute holding a JSON list of them.
GEN_AI_EVENTS_ATTRIBUTE: Final = "events"
# Older Pydantic AI names its run span "agent run" with the agent in this attribute.
PYDANTIC_AI_AGENT_NAME: Final = "agent_name"

# Traceloop framework attributes (LangChain and friends).
TRACELOOP_SPAN_KIND: Final = "traceloop.span.kind"
TRACELOOP_ENTITY_NAME: Final = "traceloop.entity.name"
TRACELOOP_WORKFLOW_NAME: Final = "traceloop.workflow.name"
TRACELOOP_AGENT_KINDS: Final = frozenset({"agent", "workflow"})
TRACELOOP_TOOL_KIND: Final = "tool"
# Traceloop copies LangGraph's node name onto the spans created inside that node, and the name of the
# agent LangChain's create_agent built (whose nodes "model" and "tools" are steps, not agents).
LANGGRAPH_NODE: Final = "traceloop.association.properties.langgraph_node"
LANGCHAIN_AGENT_NAME: Final = "traceloop.association.properties.lc_agent_name"
# Set by Traceloop on LLM spans (e.g. LangChain's), with or without the gen_ai.* attributes.
TRACELOOP_LLM_REQUEST_TYPE: Final = "llm.request.type"

# OpenInference (Arize Phoenix's convention): every span says its kind; LLM calls are "LLM".
OPENINFERENCE_SPAN_KIND: Final = "openinference.span.kind"
OPENINFERENCE_KIND_LLM: Final = "LLM"

# OpenInference attributes normalization reads: flattened messages, model, usage, tools, agents.
OPENINFERENCE_INPUT_MESSAGES_PREFIX: Final = "llm.input_messages."
OPENINFERENCE_OUTPUT_MESSAGES_PREFIX: Final = "llm.output_messages."
OPENINFERENCE_MODEL_NAME: Final = "llm.model_name"
OPENINFERENCE_REQUEST_MODEL_NAME: Final = "llm.request.model_name"
OPENINFERENCE_RESPONSE_MODEL_NAME: Final = "llm.response.model_name"
OPENINFERENCE_INVOCATION_PARAMETERS: Final = "llm.invocation_parameters"
OPENINFERENCE_PROMPT_TOKENS: Final = "llm.token_count.prompt"
OPENINFERENCE_COMPLETION_TOKENS: Final = "llm.token_count.completion"
OPENINFERENCE_FINISH_REASON: Final = "llm.finish_reason"
OPENINFERENCE_PROMPTS: Final = "llm.prompts"
OPENINFERENCE_TOOL_NAME: Final = "tool.name"
OPENINFERENCE_AGENT_NAME: Final = "agent.name"
OPENINFERENCE_GRAPH_NODE_ID: Final = "graph.node.id"
OPENINFERENCE_OUTPUT_VALUE: Final = "output.value"
# JSON text of the framework's run metadata (LangChain: holds langgraph_node).
OPENINFERENCE_METADATA: Final = "metadata"
