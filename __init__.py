"""tracelearn: make any AI agent learn from its own runs.

The public, agent-side API lives here and imports OpenTelemetry and the standard library only,
so an agent that uses it stays light:

    import tracelearn
    with tracelearn.rollout(task_id="q-17", group="calc"):
        answer = agent.run(question)
        tracelearn.emit_reward(1.0 if answer == gold else 0.0)

    system = tracelearn.prompt("calc-system")  # the registry's production version, refreshed on promotion

Subpackages (one per top-level folder of the repository): ``schemas`` (tables and attribute
names), ``storage`` (atomic files), ``processes`` (child processes), ``instrumentation`` (OpenTelemetry
distro, rollout context, emit API, token-id capture), ``collector`` (Parquet span writer and exporter),
``pipelines``, ``training``, ``models`` (finding and loading a model), ``serving``, ``registry`` and
``cli``. Data flows one way: schemas -> capture -> pipelines -> training -> registry / serving.
"""

from tracelearn.instrumentation.emit import emit_annotation, emit_message, emit_reward
from tracelearn.instrumentation.rollout_context import agent, rollout
from tracelearn.registry.prompts import prompt

__all__ = ["agent", "emit_annotation", "emit_message", "emit_reward", "prompt", "rollout"]
__version__ = "0.1.0"
