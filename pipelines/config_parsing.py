"""Reading ``pipeline.yaml``: every key checked, section by section, into a ``PipelineConfig``.

:func:`load_config` reads a file (or gives the defaults for ``None``), :func:`parse_config` a mapping;
both raise :class:`PipelineConfigError` naming the file, the key path, the bad value and what is
allowed. Stages and the reward function are imported and checked here, at load.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tracelearn.pipelines.advantages import ADVANTAGE_LEVELS
from tracelearn.pipelines.config_sections import (
    ADVANTAGE_METHODS,
    DEFAULT_SOURCE,
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
from tracelearn.pipelines.credit import CREDIT_METHODS
from tracelearn.pipelines.rewards import RewardFunctionError, load_reward_function, reward_function_file
from tracelearn.pipelines.stages import StageError, StageSpec, resolve_stage


class _Checker:
    """Field checks that raise :class:`PipelineConfigError` for one config source."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, message: str) -> PipelineConfigError:
        return PipelineConfigError(self.source, key, message)

    def section(self, raw: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        value = raw.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(key, f"{value!r} must be a mapping with keys {', '.join(allowed)}")
        self.known_keys(value, key, allowed)
        return dict(value)

    def known_keys(self, value: Mapping[Any, Any], prefix: str, allowed: tuple[str, ...]) -> None:
        for name in value:
            if name not in allowed:
                where = f"{prefix}.{name}" if prefix else str(name)
                raise self.fail(where, f"unknown key {name!r}; allowed keys: {', '.join(allowed)}")

    def choice(self, value: Any, key: str, allowed: tuple[str, ...]) -> str:
        if value not in allowed:
            raise self.fail(key, f"{value!r} is unknown; use one of {', '.join(allowed)}")
        return str(value)

    def boolean(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"{value!r} must be true or false")
        return value

    def number(self, value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.fail(key, f"{value!r} must be a finite number")
        return float(value)

    def name(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"{value!r} must be a non-empty string")
        return value

    def names(self, value: Any, key: str) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise self.fail(key, f"{value!r} must be a name or a non-empty list of names")
        return tuple(self.name(item, f"{key}[{i}]") for i, item in enumerate(items))


def _parse_select(check: _Checker, raw: Mapping[str, Any]) -> SelectConfig:
    section = check.section(raw, "select", ("agent", "llm_call"))
    agent = section.get("agent")
    if agent is not None:
        check.name(agent, "select.agent")
        try:
            re.compile(agent)
        except re.error as exc:
            raise check.fail("select.agent", f"{agent!r} is not a valid regular expression ({exc})") from None
    llm_call = section.get("llm_call")
    return SelectConfig(agent=agent, llm_call=None if llm_call is None else check.names(llm_call, "select.llm_call"))


_REWARD_KEYS: tuple[str, ...] = ("emitted", "function", "name", "feedback", "primary", "missing", "fill_value")


def _parse_reward(check: _Checker, raw: Mapping[str, Any], base_dir: Path) -> RewardConfig:
    reward = raw.get("reward")
    if isinstance(reward, Mapping) and "source" in reward:
        raise check.fail(
            "reward.source",
            "is replaced by one key per source: emitted: true|false, function: FILE.py:function, "
            "feedback: true|false (several may be on at once)",
        )
    section = check.section(raw, "reward", _REWARD_KEYS)
    emitted = check.boolean(section.get("emitted", True), "reward.emitted")
    feedback = check.boolean(section.get("feedback", False), "reward.feedback")
    function = section.get("function")
    name = section.get("name")
    function_file = None
    if function is not None:
        check.name(function, "reward.function")
        default_name = function.rpartition(":")[2].split(".")[-1]
        name = check.name(name, "reward.name") if name is not None else default_name
        function_file = reward_function_file(function, base_dir)
        try:
            load_reward_function(function, name, file=function_file)
        except RewardFunctionError as exc:
            raise check.fail("reward.function", str(exc)) from None
    elif name is not None:
        raise check.fail("reward.name", f"{name!r} names the reward function's reward; set reward.function too")
    if not (emitted or function is not None or feedback):
        raise check.fail("reward", "no reward source; set emitted: true, a function, or feedback: true")
    primary = section.get("primary")
    primary = check.name(primary, "reward.primary") if primary is not None else name
    if primary is None and feedback and not emitted:
        raise check.fail("reward.primary", "is required when feedback is the only reward source (a feedback name)")
    # Nothing configured beyond the default emitted rewards: keep the rollouts (a first build yields
    # transitions, with null rewards, and the build says how to add a reward).
    default_missing = "drop" if function is not None or feedback else "keep"
    missing = check.choice(section.get("missing", default_missing), "reward.missing", MISSING_REWARD_POLICIES)
    fill_value = section.get("fill_value")
    if missing == "fill":
        fill_value = check.number(fill_value, "reward.fill_value") if fill_value is not None else 0.0
    elif fill_value is not None:
        raise check.fail(
            "reward.fill_value", f"{fill_value!r} is only used with reward.missing 'fill', not {missing!r}"
        )
    return RewardConfig(emitted, function, name, feedback, primary, missing, fill_value, function_file)


def _parse_stages(check: _Checker, raw: Mapping[str, Any]) -> tuple[StageSpec, ...]:
    value = raw.get("stages")
    if value is None:
        return ()
    timeout_s = _parse_timeouts(check, raw).stage_seconds
    if not isinstance(value, list):
        raise check.fail("stages", f"{value!r} must be a list of stage names or {{name: {{params}}}} mappings")
    specs = []
    for i, item in enumerate(value):
        key = f"stages[{i}]"
        if isinstance(item, str):
            spec = StageSpec(item, timeout_s=timeout_s)
        elif isinstance(item, Mapping) and len(item) == 1:
            ((name, params),) = item.items()
            if params is None:
                params = {}
            if (
                not isinstance(name, str)
                or not isinstance(params, Mapping)
                or not all(isinstance(k, str) for k in params)
            ):
                raise check.fail(key, f"{dict(item)!r} must be {{stage_name: {{param: value, ...}}}}")
            spec = StageSpec(name, dict(params), timeout_s)
        else:
            raise check.fail(key, f"{item!r} must be a stage name or a one-key mapping {{stage_name: {{params}}}}")
        try:
            resolve_stage(spec)
        except StageError as exc:
            raise check.fail(key, str(exc)) from None
        specs.append(spec)
    return tuple(specs)


def _parse_credit(check: _Checker, raw: Mapping[str, Any]) -> CreditConfig:
    section = check.section(raw, "credit", ("method", "gamma", "include_final_reward"))
    method = check.choice(section.get("method", "identical"), "credit.method", CREDIT_METHODS)
    if "gamma" in section:
        gamma = check.number(section["gamma"], "credit.gamma")
        if not 0.0 < gamma <= 1.0:
            raise check.fail(
                "credit.gamma", f"{section['gamma']!r} is out of range; use a value in (0, 1] (1 = no discount)"
            )
        if method != "discounted" and gamma != 1.0:
            raise check.fail(
                "credit.gamma", f"{section['gamma']!r} is only used by method 'discounted', not {method!r}; drop gamma"
            )
    elif method == "discounted":
        raise check.fail("credit.gamma", "is required by method 'discounted' (a value in (0, 1])")
    else:
        gamma = 1.0
    include = section.get("include_final_reward")
    if include is not None and method != "process":
        raise check.fail("credit.include_final_reward", f"{include!r} is only used by method 'process', not {method!r}")
    include_final_reward = True if include is None else check.boolean(include, "credit.include_final_reward")
    return CreditConfig(method, gamma, include_final_reward)


def _parse_advantage(check: _Checker, raw: Mapping[str, Any]) -> AdvantageConfig:
    section = check.section(raw, "advantage", ("method", "group_by", "normalize_std", "level", "epsilon"))
    method = check.choice(section.get("method", "grpo"), "advantage.method", ADVANTAGE_METHODS)
    group_by = check.names(section.get("group_by", "task_id"), "advantage.group_by")
    normalize_std = check.boolean(section.get("normalize_std", True), "advantage.normalize_std")
    level = check.choice(section.get("level", "rollout"), "advantage.level", ADVANTAGE_LEVELS)
    epsilon = check.number(section.get("epsilon", 1e-6), "advantage.epsilon")
    if epsilon < 0:
        raise check.fail("advantage.epsilon", f"{section['epsilon']!r} must be >= 0")
    return AdvantageConfig(method, group_by, normalize_std, level, epsilon)


def _parse_watermark(check: _Checker, raw: Mapping[str, Any]) -> WatermarkConfig:
    section = check.section(raw, "watermark", ("lateness_seconds",))
    default = WatermarkConfig.lateness_seconds
    lateness = check.number(section.get("lateness_seconds", default), "watermark.lateness_seconds")
    if lateness < 0:
        raise check.fail("watermark.lateness_seconds", f"{section['lateness_seconds']!r} must be >= 0")
    return WatermarkConfig(lateness)


def _parse_conversation(check: _Checker, raw: Mapping[str, Any]) -> ConversationConfig:
    section = check.section(raw, "conversation", ("window_seconds", "sequence_gap_seconds"))
    values = []
    for key, default in (
        ("window_seconds", ConversationConfig.window_seconds),
        ("sequence_gap_seconds", ConversationConfig.sequence_gap_seconds),
    ):
        value = check.number(section.get(key, default), f"conversation.{key}")
        if value < 0:
            raise check.fail(f"conversation.{key}", f"{section[key]!r} must be >= 0")
        values.append(value)
    return ConversationConfig(*values)


def _parse_timeouts(check: _Checker, raw: Mapping[str, Any]) -> TimeoutsConfig:
    keys = ("reward_function_seconds", "stage_seconds")
    section = check.section(raw, "timeouts", keys)
    seconds = []
    for key in keys:
        value = check.number(section.get(key, getattr(TimeoutsConfig, key)), f"timeouts.{key}")
        if value <= 0:
            raise check.fail(f"timeouts.{key}", f"{section[key]!r} must be a number of seconds > 0")
        seconds.append(value)
    return TimeoutsConfig(*seconds)


_TOP_LEVEL: tuple[str, ...] = (
    "select",
    "reward",
    "stages",
    "credit",
    "advantage",
    "watermark",
    "conversation",
    "trajectory",
    "timeouts",
)


def parse_config(raw: Mapping[str, Any] | None, source: str = DEFAULT_SOURCE,
                 base_dir: str | Path | None = None) -> PipelineConfig:
    """Validate a config mapping (as read from YAML) into a :class:`PipelineConfig`.

    ``source`` (the file name) prefixes every error; a reward function named by a file
    (``FILE.py:function``) is read relative to ``base_dir`` (the config file's directory; default: the
    current directory). Raises :class:`PipelineConfigError` for an
    unknown key at any level, a value of the wrong type or out of range, an invalid ``select.agent``
    regex, a stage that does not resolve or a reward function that cannot be imported.
    """
    check = _Checker(source)
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise check.fail(
            "", f"the config must be a mapping with keys {', '.join(_TOP_LEVEL)}, not {type(raw).__name__}"
        )
    check.known_keys(raw, "", _TOP_LEVEL)
    return PipelineConfig(
        select=_parse_select(check, raw),
        reward=_parse_reward(check, raw, Path(base_dir) if base_dir is not None else Path.cwd()),
        stages=_parse_stages(check, raw),
        credit=_parse_credit(check, raw),
        advantage=_parse_advantage(check, raw),
        watermark=_parse_watermark(check, raw),
        conversation=_parse_conversation(check, raw),
        trajectory=check.boolean(raw.get("trajectory", False), "trajectory"),
        timeouts=_parse_timeouts(check, raw),
    )


def load_config(path: str | Path | None) -> PipelineConfig:
    """Read and validate ``pipeline.yaml``; ``None`` gives the defaults (see the module docstring).

    Raises :class:`PipelineConfigError` naming the file for a missing file, a YAML syntax error or
    any invalid field (see :func:`parse_config`).
    """
    if path is None:
        return PipelineConfig()
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PipelineConfigError(source, "", f"cannot read the config file ({exc.strerror or exc})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PipelineConfigError(source, "", f"is not valid YAML: {exc}") from None
    return parse_config(raw, source, Path(path).parent)
