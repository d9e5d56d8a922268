"""``train.yaml``: the trainers' settings, parsed and validated before any model is loaded.

One file holds every section; each trainer reads its own plus the shared ones, and every key is
optional (the dataclass defaults below are the defaults)::

    grpo: {learning_rate: 1.0e-5, epochs: 1, mini_batch_size: 32, clip_low: 0.2, clip_high: 0.2,
           kl_beta: 0.0, loss_aggregation: token_mean}
    sft: {min_reward: 1.0, learning_rate: 2.0e-5, epochs: 2, batch_size: 8}
    lora: {r: 16, alpha: 32, dropout: 0.0, target_modules: [q_proj, k_proj, v_proj, o_proj]}   # absent: full FT
    runtime: {precision: auto, device: auto, gradient_checkpointing: false, micro_batch_tokens: 4096, seed: 0}
    sampling: {truncated: keep}                      # rows sampled with top_p < 1 or top_k > 0: keep | drop
    off_policy: {mode: importance, cap: 2.0}         # rows of another model version: importance | drop | keep

:func:`load_train_config` reads a file (or gives the defaults for ``None``) and :func:`parse_train_config`
a mapping; both check every key against the dataclass fields and their types and raise
:class:`TrainConfigError` naming the source, the key path, the bad value and what is allowed.
CLI flags override single keys (:func:`with_overrides`, ``key.path=value``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

__all__ = [
    "LOSS_AGGREGATIONS",
    "PRECISIONS",
    "GrpoConfig",
    "LoraConfig",
    "OffPolicyConfig",
    "RuntimeConfig",
    "SamplingConfig",
    "SftConfig",
    "TrainConfig",
    "TrainConfigError",
    "check_ranges",
    "config_as_dict",
    "load_train_config",
    "parse_lora_flag",
    "parse_train_config",
    "train_config_hash",
    "with_overrides",
]

LossAggregation = Literal["token_mean", "seq_mean", "dr_grpo"]
Precision = Literal["auto", "fp32", "bf16"]
RecomputeLogprobs = Literal["missing", "always"]
TruncatedSampling = Literal["keep", "drop"]
OffPolicyMode = Literal["importance", "drop", "keep"]
LOSS_AGGREGATIONS: tuple[str, ...] = get_args(LossAggregation)
PRECISIONS: tuple[str, ...] = get_args(Precision)
DEFAULT_SOURCE = "<defaults>"


class TrainConfigError(ValueError):
    """A training setting is invalid: names the source, the key path and what is allowed."""

    def __init__(self, source: str, key: str, message: str) -> None:
        super().__init__(f"{source}: {key}: {message}")
        self.source, self.key = source, key


@dataclass(frozen=True)
class GrpoConfig:
    """Clipped policy-gradient (GRPO) settings; the advantages come from the transitions table.

    ``clip_low`` / ``clip_high`` bound the importance ratio to ``[1 - clip_low, 1 + clip_high]``
    (equal by default; a larger ``clip_high`` is DAPO's clip-higher). ``kl_beta`` weighs the k3 KL
    estimate to the reference policy (the model before training); 0 skips the reference pass.
    ``dr_grpo_normalizer`` is the constant token count Dr. GRPO divides by (default: the longest
    response in the data, fixed for the whole run). ``skip_zero_advantage`` leaves out sequences
    whose advantage is 0 (groups with equal rewards): they carry no gradient without a KL term.
    ``recompute_logprobs``: ``missing`` uses the logprobs recorded at capture and recomputes only
    where a transition has none (counted); ``always`` recomputes every one with the starting weights.
    """

    learning_rate: float = 1e-5
    epochs: int = 1
    mini_batch_size: int = 32
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_beta: float = 0.0
    loss_aggregation: LossAggregation = "token_mean"
    dr_grpo_normalizer: int | None = None
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    warmup_steps: int = 0
    skip_zero_advantage: bool = True
    recompute_logprobs: RecomputeLogprobs = "missing"


@dataclass(frozen=True)
class SftConfig:
    """Rejection-sampling fine-tuning: cross-entropy on the response tokens of good transitions.

    Transitions whose primary ``reward`` is at least ``min_reward`` are kept; identical
    (prompt, response) token sequences are kept once unless ``keep_duplicates``.
    """

    min_reward: float = 1.0
    learning_rate: float = 2e-5
    epochs: int = 2
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    keep_duplicates: bool = False


@dataclass(frozen=True)
class LoraConfig:
    """A peft LoRA adapter instead of full fine-tuning (absent from the config: full fine-tuning)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the model runs, shared by both trainers.

    ``precision``: ``auto`` is bf16 on a CUDA GPU that supports it and on CPUs with native bf16
    matrix units (AMX or AVX512-BF16; elsewhere bf16 is emulated and slower than fp32), else fp32.
    Master weights stay fp32 either way (autocast). ``micro_batch_tokens`` bounds one forward pass
    (computed tokens); gradients accumulate over micro-batches up to the optimizer step.
    ``share_prefix``: a prompt prefix every sequence of a micro-batch shares (an agent's system prompt
    and tool declarations) is computed once for all of them; exact, and off under gradient
    checkpointing.
    """

    precision: Precision = "auto"
    device: str = "auto"
    gradient_checkpointing: bool = False
    micro_batch_tokens: int = 4096
    seed: int = 0
    max_sequence_tokens: int | None = None
    share_prefix: bool = True


@dataclass(frozen=True)
class SamplingConfig:
    """How the trainer treats the way each transition was sampled (its ``temperature``, ``top_p``, ``top_k``).

    The policy's logprobs are always computed on the logits divided by the transition's recorded
    temperature (as the server did before sampling; unknown or 0 means 1, and is counted). A transition
    sampled with truncation (``top_p`` < 1 or ``top_k`` > 0) recorded logprobs of the truncated,
    renormalized distribution, which the trainer cannot reproduce exactly. ``truncated``: ``keep`` trains
    on them with the untruncated tempered distribution in the ratio's numerator (so the first step's ratio
    is the nucleus' probability mass, at most 1, rather than exactly 1: a bias towards smaller updates
    that the clip bounds); ``drop`` leaves them out. Both are counted in the run's summary.
    """

    truncated: TruncatedSampling = "keep"


@dataclass(frozen=True)
class OffPolicyConfig:
    """Transitions generated by another model version than the one training starts from.

    The start version is the one ``tracelearn serve`` reports for the same model (``calc-policy@4+<digest>``
    for a registry reference, ``<name>@<weights digest>`` for a path); a transition's is its
    ``model_version``; a transition without one counts as on-policy (``version_unknown``).
    ``mode``: ``importance`` (default) computes the ratio's denominator with the starting weights and
    multiplies each token's policy-gradient loss by the truncated importance weight
    ``min(exp(logp_start - logp_recorded), cap)`` (detached: TIS), so the data another version sampled
    is weighed by how likely the starting policy is to have sampled it (rows without recorded logprobs
    cannot be weighed and are dropped, counted); ``drop`` leaves them out; ``keep`` treats them as
    on-policy. Counted in the run's summary.
    """

    mode: OffPolicyMode = "importance"
    cap: float = 2.0


@dataclass(frozen=True)
class TrainConfig:
    """Every section of ``train.yaml``; ``lora`` is None for full fine-tuning."""

    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    lora: LoraConfig | None = None
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    off_policy: OffPolicyConfig = field(default_factory=OffPolicyConfig)


# Ranges that a type alone does not say: (section, key) -> (check, what is allowed).
_RANGES: dict[tuple[str, str], tuple[typing.Callable[[Any], bool], str]] = {
    ("grpo", "learning_rate"): (lambda v: v > 0, "a positive number"),
    ("grpo", "epochs"): (lambda v: v >= 1, "at least 1"),
    ("grpo", "mini_batch_size"): (lambda v: v >= 1, "at least 1"),
    ("grpo", "clip_low"): (lambda v: 0 <= v < 1, "in [0, 1)"),
    ("grpo", "clip_high"): (lambda v: v >= 0, "at least 0"),
    ("grpo", "kl_beta"): (lambda v: v >= 0, "at least 0"),
    ("grpo", "dr_grpo_normalizer"): (lambda v: v is None or v >= 1, "at least 1"),
    ("grpo", "max_grad_norm"): (lambda v: v > 0, "a positive number"),
    ("grpo", "weight_decay"): (lambda v: v >= 0, "at least 0"),
    ("grpo", "warmup_steps"): (lambda v: v >= 0, "at least 0"),
    ("sft", "learning_rate"): (lambda v: v > 0, "a positive number"),
    ("sft", "epochs"): (lambda v: v >= 1, "at least 1"),
    ("sft", "batch_size"): (lambda v: v >= 1, "at least 1"),
    ("sft", "gradient_accumulation_steps"): (lambda v: v >= 1, "at least 1"),
    ("sft", "max_grad_norm"): (lambda v: v > 0, "a positive number"),
    ("sft", "warmup_ratio"): (lambda v: 0 <= v < 1, "in [0, 1)"),
    ("lora", "r"): (lambda v: v >= 1, "at least 1"),
    ("lora", "alpha"): (lambda v: v >= 1, "at least 1"),
    ("lora", "dropout"): (lambda v: 0 <= v < 1, "in [0, 1)"),
    ("lora", "target_modules"): (lambda v: len(v) >= 1, "a non-empty list of module names"),
    ("runtime", "micro_batch_tokens"): (lambda v: v >= 16, "at least 16"),
    ("runtime", "max_sequence_tokens"): (lambda v: v is None or v >= 2, "at least 2"),
    ("off_policy", "cap"): (lambda v: v >= 1, "at least 1 (a weight capped below 1 shrinks on-policy-like rows too)"),
}


def check_ranges(config: TrainConfig, source: str = "<python>") -> None:
    """Raise :class:`TrainConfigError` for a value out of range (trainers call it for configs built in code)."""
    for (section_name, key), (allowed, description) in _RANGES.items():
        section = getattr(config, section_name)
        if section is None:
            continue
        value = getattr(section, key)
        if not allowed(value):
            raise TrainConfigError(source, f"{section_name}.{key}", f"{value!r} must be {description}")


def _is_optional(annotation: Any) -> tuple[bool, Any]:
    if get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1 and len(get_args(annotation)) == 2:
            return True, members[0]
    return False, annotation


def _convert(value: Any, annotation: Any, source: str, key: str) -> Any:
    """``value`` checked against (and converted to) the field type ``annotation``."""
    optional, inner = _is_optional(annotation)
    if value is None:
        if optional:
            return None
        raise TrainConfigError(source, key, "must not be empty")
    if dataclasses.is_dataclass(inner) and isinstance(inner, type):
        return _build(inner, value, source, key)
    if get_origin(inner) is Literal:
        choices = get_args(inner)
        if value not in choices:
            raise TrainConfigError(source, key, f"{value!r} is unknown; use one of {', '.join(map(str, choices))}")
        return value
    if inner is bool:
        if not isinstance(value, bool):
            raise TrainConfigError(source, key, f"{value!r} must be true or false")
        return value
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TrainConfigError(source, key, f"{value!r} must be a whole number")
        return value
    if inner is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise TrainConfigError(source, key, f"{value!r} must be a finite number")
        return float(value)
    if inner is str:
        if not isinstance(value, str) or not value.strip():
            raise TrainConfigError(source, key, f"{value!r} must be a non-empty string")
        return value
    if get_origin(inner) is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) and i for i in items):
            raise TrainConfigError(source, key, f"{value!r} must be a list of names")
        return tuple(items)
    raise TypeError(f"train config field {key} has an unsupported type {annotation!r}")


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        raise TrainConfigError(source, prefix or "<top>", f"{raw!r} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [str(k) for k in raw if k not in names]
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise TrainConfigError(source, where, f"unknown key {unknown[0]!r}; allowed keys: {', '.join(names)}")
    values = {name: _convert(raw[name], hints[name], source, f"{prefix}.{name}" if prefix else name)
              for name in names if name in raw}
    return cls(**values)


def parse_train_config(raw: Mapping[str, Any] | None, source: str = DEFAULT_SOURCE) -> TrainConfig:
    """A validated :class:`TrainConfig` from a decoded YAML mapping (``None``: every default)."""
    data = dict(raw or {})
    # ``lora: {}`` (or ``lora: true``) turns LoRA on with its defaults; ``lora: false``/absent is full fine-tuning.
    if data.get("lora") is True:
        data["lora"] = {}
    elif data.get("lora") is False:
        data.pop("lora")
    config = _build(TrainConfig, data, source, "")
    assert isinstance(config, TrainConfig)
    check_ranges(config, source)
    return config


def load_train_config(path: str | Path | None) -> TrainConfig:
    """Read and validate ``train.yaml`` (``None``: the defaults)."""
    if path is None:
        return TrainConfig()
    location = Path(path)
    try:
        raw = yaml.safe_load(location.read_text(encoding="utf-8"))
    except OSError as error:
        raise TrainConfigError(str(location), "<file>", f"cannot be read: {error.strerror or error}") from error
    except yaml.YAMLError as error:
        raise TrainConfigError(str(location), "<file>", f"is not valid YAML: {error}") from error
    if raw is not None and not isinstance(raw, Mapping):
        raise TrainConfigError(
            str(location), "<top>", "must be a mapping of sections (grpo, sft, lora, runtime, sampling, off_policy)"
        )
    return parse_train_config(raw, str(location))


def config_as_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as plain JSON-ready data (tuples as lists)."""
    plain: dict[str, Any] = json.loads(json.dumps(dataclasses.asdict(config)))
    return plain


def train_config_hash(config: TrainConfig) -> str:
    """SHA-256 of the canonical JSON of ``config``: recorded in the run and its lineage."""
    canonical = json.dumps(config_as_dict(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def with_overrides(config: TrainConfig, overrides: Mapping[str, Any], source: str = "command line") -> TrainConfig:
    """``config`` with ``section.key`` values replaced (values already typed, e.g. from click), re-validated."""
    data = config_as_dict(config)
    for path, value in overrides.items():
        section, _, key = path.partition(".")
        if section == "lora" and not key:
            data["lora"] = value
            continue
        if section not in data or not key:
            raise TrainConfigError(
                source, path, "overrides are written section.key (grpo, sft, lora, runtime, sampling, off_policy)"
            )
        if data[section] is None:
            data[section] = {}
        data[section][key] = value
    return parse_train_config(data, source)


def parse_lora_flag(text: str) -> dict[str, Any]:
    """``--lora r=16,alpha=32,target_modules=q_proj+v_proj`` (or ``--lora on``) as a ``lora`` section."""
    if text.strip().lower() in ("on", "true", "yes", ""):
        return {}
    section: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise TrainConfigError("--lora", item, "write key=value pairs separated by commas, e.g. r=16,alpha=32")
        if key == "target_modules":
            section[key] = [name for name in value.split("+") if name]
        elif key == "dropout":
            try:
                section[key] = float(value)
            except ValueError:
                raise TrainConfigError("--lora", key, f"{value!r} must be a number") from None
        else:
            try:
                section[key] = int(value)
            except ValueError:
                raise TrainConfigError("--lora", key, f"{value!r} must be a whole number") from None
    return section
