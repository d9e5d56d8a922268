"""Agent-side capture: the OpenTelemetry distro and configurator, rollout context, the emit API
(rewards, annotations, messages) and the token-id/logprob capture hooks for OpenAI-compatible clients.

May import: opentelemetry, tracelearn.schemas and (lazily, only to build the exporter)
tracelearn.collector. Must never import polars, torch or airflow: this code runs inside the agent.
Every hook catches its own errors: instrumentation never raises into the agent.
"""
