"""What each section of ``pipeline.yaml`` holds, with its defaults: ``PipelineConfig`` and its parts
(``SelectConfig``, ``RewardConfig``, ...), and ``PipelineConfigError``. ``config_parsing`` builds them
from a file; ``tracelearn.pipelines.config`` is where callers import them from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tracelearn.pipelines.rewards import DEFAULT_REWARD_TIMEOUT_S
from tracelearn.pipelines.rollout_identity import JoinConfig
from tracelearn.pipelines.rollouts import DEFAULT_LATENESS
from tracelearn.pipelines.stages import DEFAULT_STAGE_TIMEOUT_S, StageSpec

MISSING_REWARD_POLICIES: tuple[str, ...] = ("drop", "keep", "fill")
ADVANTAGE_METHODS: tuple[str, ...] = ("grpo",)
DEFAULT_SOURCE = "<defaults>"


class PipelineConfigError(ValueError):
    """A pipeline config is invalid; the message names the file, the key, the value and the fix."""

    def __init__(self, source: str, key: str, message: str) -> None:
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")
        self.source = source
        self.key = key


@dataclass(frozen=True)
class SelectConfig:
    """Which LLM calls become transitions: ``agent`` is a regex (full match) on ``agent_name``,
    ``llm_call`` the allowed ``gen_ai.operation.name`` values; ``None`` means all."""

    agent: str | None = None
    llm_call: tuple[str, ...] | None = None


@dataclass(frozen=True)
class RewardConfig:
    """Where rewards come from (any of emitted spans, a function, feedback), which is primary, and what
    to do with rollouts without one. ``function_file`` is the file a ``FILE.py:function`` names, resolved
    against the config's directory (not part of the config hash: moving a checkout changes no output)."""

    emitted: bool = True
    function: str | None = None
    name: str | None = None
    feedback: bool = False
    primary: str | None = None
    missing: str = "keep"
    fill_value: float | None = None
    function_file: Path | None = None


@dataclass(frozen=True)
class CreditConfig:
    """Arguments of ``tracelearn.pipelines.credit.assign_credit``."""

    method: str = "identical"
    gamma: float = 1.0
    include_final_reward: bool = True


@dataclass(frozen=True)
class AdvantageConfig:
    """Arguments of ``tracelearn.pipelines.advantages.grpo_advantages``."""

    method: str = "grpo"
    group_by: tuple[str, ...] = ("task_id",)
    normalize_std: bool = True
    level: str = "rollout"
    epsilon: float = 1e-6


@dataclass(frozen=True)
class WatermarkConfig:
    """How long after its last span a rollout waits before it is built (late spans)."""

    lateness_seconds: float = DEFAULT_LATENESS.total_seconds()


@dataclass(frozen=True)
class ConversationConfig:
    """How LLM calls without a common trace join into rollouts (see ``JoinConfig``)."""

    window_seconds: float = JoinConfig.window.total_seconds()
    sequence_gap_seconds: float = JoinConfig.gap.total_seconds()


@dataclass(frozen=True)
class TimeoutsConfig:
    """Seconds one call of user code may take: a reward function call, a user stage call."""

    reward_function_seconds: float = DEFAULT_REWARD_TIMEOUT_S
    stage_seconds: float = DEFAULT_STAGE_TIMEOUT_S


@dataclass(frozen=True)
class PipelineConfig:
    """The whole parsed ``pipeline.yaml``; ``PipelineConfig()`` is the defaults."""

    select: SelectConfig = field(default_factory=SelectConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    stages: tuple[StageSpec, ...] = ()
    credit: CreditConfig = field(default_factory=CreditConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    watermark: WatermarkConfig = field(default_factory=WatermarkConfig)
    conversation: ConversationConfig = field(default_factory=ConversationConfig)
    trajectory: bool = False
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
