"""Agent-side capture: the OpenTelemetry distro and configurator, rollout context, the emit API
(rewards, annotations, messages) and the token-id/logprob capture hooks for OpenAI-compatible clients.

May import: opentelemetry, tracelearn.schemas, tracelearn.settings. Must never import the collector
(the exporter it configures is found by its entry point), polars, torch or airflow: this code runs
inside the agent.
Every hook catches its own errors: instrumentation never raises into the agent.
"""
