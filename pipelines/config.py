"""``pipeline.yaml``: the experience pipeline's configuration, parsed and validated before any data.

Example (every key is optional; an omitted key takes the default shown in the comment)::

    select: {agent: "writer|planner", llm_call: "chat"}   # all agents, all LLM calls
    reward: {function: reward.py:score, name: correct}   # emitted rewards only
    stages: [drop_failed_rollouts, {my_pkg.stages:dedupe_by_prompt: {keep: last}}]   # none
    credit: {method: identical}              # identical | discounted(gamma) | last_step | process
    advantage: {method: grpo, group_by: task_id, normalize_std: true, level: rollout}
    watermark: {lateness_seconds: 600}
    conversation: {window_seconds: 600, sequence_gap_seconds: 30}
    trajectory: false
    timeouts: {reward_function_seconds: 60, stage_seconds: 60}

``reward``: several sources at once, every named reward of every source lands in the rollout's
``rewards`` (``tracelearn.pipelines.rewards`` says how each is computed and joined):
``emitted`` (default true: ``emit_reward`` spans), ``function`` (applied to each rollout in the
pipeline: ``FILE.py:function``, a Python file relative to this config file's directory, or
``package.module:function``, a module on the import path; a number it returns is stored under
``name``, default the function's name, a dict under its keys) and ``feedback`` (default false: the feedback table
``<data root>/feedback/``). ``primary`` names the reward to train on (default: ``name`` when a
function is given, else the first emitted, else the earliest feedback; required when feedback is the
only source). ``missing`` says what happens to a rollout without a primary reward: ``drop``
(counted), ``keep`` (reward null) or ``fill`` (with ``fill_value``, default 0); the default is
``drop`` when a function or feedback is configured, else ``keep`` (a first build, before any reward
is configured, still yields transitions, with null rewards).

``conversation``: how LLM calls without a common trace join into rollouts
(``tracelearn.pipelines.rollout_identity``): ``window_seconds`` (a call carries on a conversation
whose previous call ended at most this long before it) and ``sequence_gap_seconds`` (the sequence
rule's gap between two calls of one process and thread).

:func:`load_config` reads a file (or gives the defaults for ``None``), :func:`parse_config` a
mapping; both check every field and raise :class:`PipelineConfigError` naming the file, the key
path, the bad value and what is allowed. Stages and the reward function are imported and checked
at load. :func:`config_hash` is the ``pipeline_config_hash`` written into every output row.

This module is where callers import the config from; it holds what is derived from a parsed config
(its hash, and what it asks of rollouts, joins and rewards). The sections' types live in
``config_sections``, the reading and checking in ``config_parsing``.

``timeouts``: how long one call of user code may take: ``reward_function_seconds`` per reward function
call (a call past it is stopped and its rollout counted as timed out), ``stage_seconds`` per user stage
call (a stage past it fails the build, naming the stage). They bound how a build runs, not what it
computes, so :func:`config_hash` leaves them out.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

from tracelearn.pipelines.config_parsing import load_config, parse_config
from tracelearn.pipelines.config_sections import (
    ADVANTAGE_METHODS,
    MISSING_REWARD_POLICIES,
    AdvantageConfig,
    ConversationConfig,
    CreditConfig,
    PipelineConfig,
    PipelineConfigError,
    RewardConfig,
    SelectConfig,
    TimeoutsConfig,
    WatermarkConfig,
)
from tracelearn.pipelines.rewards import (
    RewardFunctionError,
    RewardSources,
    feedback_directory,
    load_reward_function,
    scan_feedback,
)
from tracelearn.pipelines.rollout_identity import JoinConfig
from tracelearn.pipelines.rollouts import RolloutConfig

__all__ = [
    "ADVANTAGE_METHODS",
    "MISSING_REWARD_POLICIES",
    "AdvantageConfig",
    "ConversationConfig",
    "CreditConfig",
    "PipelineConfig",
    "PipelineConfigError",
    "RewardConfig",
    "SelectConfig",
    "TimeoutsConfig",
    "WatermarkConfig",
    "config_as_dict",
    "config_hash",
    "join_config",
    "load_config",
    "parse_config",
    "reward_sources",
    "rollout_config",
]


def rollout_config(config: PipelineConfig) -> RolloutConfig:
    """The :class:`~tracelearn.pipelines.rollouts.RolloutConfig` that ``config`` asks for."""
    reward = config.reward
    return RolloutConfig(
        lateness=dt.timedelta(seconds=config.watermark.lateness_seconds),
        missing_reward="drop" if reward.missing == "drop" else "fill" if reward.missing == "fill" else "keep",
        fill_reward=reward.fill_value if reward.fill_value is not None else 0.0,
    )


def join_config(config: PipelineConfig) -> JoinConfig:
    """The :class:`~tracelearn.pipelines.rollout_identity.JoinConfig` that ``config`` asks for."""
    conversation = config.conversation
    return JoinConfig(
        window=dt.timedelta(seconds=conversation.window_seconds),
        gap=dt.timedelta(seconds=conversation.sequence_gap_seconds),
    )


def reward_sources(config: PipelineConfig, data_root: str | Path) -> RewardSources:
    """The reward sources ``config`` asks for, the feedback read from ``data_root`` (a data root or its
    ``spans/`` directory); the reward function is imported (checked again, as at load)."""
    reward = config.reward
    function = None
    if reward.function is not None:
        try:
            function = load_reward_function(
                reward.function, reward.name or reward.function, config.timeouts.reward_function_seconds,
                file=reward.function_file,
            )
        except RewardFunctionError as exc:
            raise PipelineConfigError("<config>", "reward.function", str(exc)) from None
    feedback = scan_feedback(feedback_directory(data_root)) if reward.feedback else None
    return RewardSources(emitted=reward.emitted, function=function, feedback=feedback, primary=reward.primary)


def _as_floats(value: Any) -> Any:
    """``value`` with every int in a ``float`` field made a float (``0`` and ``0.0`` are one setting)."""
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        return value
    changes = {}
    for field_ in dataclasses.fields(value):
        current = getattr(value, field_.name)
        if field_.type in ("float", "float | None") and isinstance(current, int) and not isinstance(current, bool):
            changes[field_.name] = float(current)
        elif dataclasses.is_dataclass(current):
            changes[field_.name] = _as_floats(current)
    return dataclasses.replace(value, **changes) if changes else value


def config_as_dict(config: PipelineConfig) -> dict[str, Any]:
    """The config as plain JSON-able data (tuples as lists), defaults included."""
    data: dict[str, Any] = json.loads(json.dumps(dataclasses.asdict(_as_floats(config)), default=str))
    return data


def config_hash(config: PipelineConfig) -> str:
    """SHA-256 (hex) of the canonical JSON of the parsed config: ``pipeline_config_hash``.

    Keys are sorted and defaults are filled in by parsing, so key order and writing a default out
    or leaving it implicit do not change the hash; any changed value (a stage parameter included)
    does. ``timeouts`` are left out: they bound how long a build may run, not what it computes; so is
    the reward file's resolved location (``reward.function`` as written is kept).
    """
    hashed = {key: value for key, value in config_as_dict(config).items() if key != "timeouts"}
    del hashed["reward"]["function_file"]  # where the checkout is, not what the config computes
    hashed["stages"] = [{k: v for k, v in stage.items() if k != "timeout_s"} for stage in hashed["stages"]]
    canonical = json.dumps(hashed, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
