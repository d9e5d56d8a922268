"""The agent loop that runs inside verl and replays stored transitions instead of sampling.

Owns the contract between one verl-replay row (``tracelearn.pipelines.export_verl.REPLAY_SCHEMA``)
and verl's ``AgentLoopOutput``: :func:`replay_output_fields` (pure, no verl needed) and, only where
verl is importable, the ``ReplayAgentLoop`` class registered as ``tracelearn_replay``.

This file runs in *verl's* Python environment (verl pins its own torch and vLLM), where tracelearn
need not be installed: ``tracelearn.training.verl_backend`` copies it into the job directory as the
top-level module ``tracelearn_replay_loop`` and puts that directory on ``PYTHONPATH``. So it imports
the standard library only, and verl lazily; keep it that way.

How verl calls it (verl 0.9.1, the version ``verl_backend`` pins; ``verl/utils/dataset/rl_dataset.py``,
``verl/experimental/agent_loop/agent_loop.py``, ``verl/trainer/ppo/v1/agent_loop_tq.py``,
``verl/trainer/ppo/v1/trainer_base.py``, ``verl/trainer/ppo/core_algos.py``; the contract tests in
``tests/contracts/`` run this file against that release):

- ``RLHFDataset.__getitem__`` returns every Parquet column of the row (plus ``raw_prompt``,
  ``index``, ``tools_kwargs``, ``interaction_kwargs``, ``dummy_tensor``; the trainer adds ``uid``,
  the V1 worker ``global_steps`` and ``session_id``), and the agent-loop worker passes them as keyword
  arguments to ``run(sampling_params, **kwargs)``. Lists arrive as Python lists, structs as dicts.
- The V1 trainer (``trainer.use_v1``, the default since 0.9.0) then merges those same keyword
  arguments into the sample it stores (``AgentLoopWorkerTQ._agent_loop_postprocess``:
  ``field.update(kwargs)``), over the keys of ``AgentLoopOutput.as_dict()``. So the stored tokens
  travel in one struct column, ``tracelearn_replay``, a name verl never uses: a column named
  ``response_mask`` would replace verl's tensor mask (and its loss mask) with a Python list.
- The entry in the agent-loop config file (``actor_rollout_ref.rollout.agent.agent_loop_config_path``)
  is handed to ``hydra.utils.instantiate`` together with verl's own arguments (``trainer_config``,
  ``server_manager``, ``tokenizer``, ``processor``, ``dataset_cls``, ``data_config``,
  ``hf_model_type``, ``tools``), so its extra keys (``replay_logprobs``) reach ``__init__`` as
  keyword arguments.
- A non-null ``reward_score`` makes verl skip its reward function and place the score on the last
  response token (``rm_scores``); the GRPO estimator then sums it back to one score per sequence.

What it returns, and why the reward score is the stored *advantage*: the pipeline has already
assigned credit and computed GRPO advantages per task group (``tracelearn.pipelines.advantages``,
normalized per rollout or not, Dr. GRPO or not), and the torch trainer trains on exactly those.
verl would group the n repeats of one dataset row by its ``uid``; replaying one stored transition n
times gives n identical scores and an advantage of 0 for all of them. So the job runs
``rollout.n=1`` and ``algorithm.norm_adv_by_std_in_grpo=False``: verl's GRPO gives a group of one
mean 0 (and would give std 1), so the advantage it computes is the score we return, unchanged. The
transition's reward stays in the Parquet row (``extra_info.reward``) for inspection.

On-policy-ness, exactly. Each stored response was sampled by the behaviour policy: the weights that
served at capture time, with that server's sampling settings. Training starts from
``actor_rollout_ref.model.path``. When those are the same weights, the first mini-batch of the first
epoch is on-policy up to the numerical difference between the inference engine and the trainer;
when the data came from earlier versions (the production alias moved while data accumulated) or
from another model, the whole first epoch is off-policy by that gap. verl's PPO ratio is
``pi_theta / pi_old``, and what ``pi_old`` is depends on the job (``verl_backend`` decides):

- ``grpo.recompute_logprobs: missing`` and every training row has stored logprobs: the job sets
  ``algorithm.rollout_correction.bypass_mode=True`` and this loop returns the stored logprobs, so
  ``pi_old`` is the behaviour policy and the clipped ratio measures and bounds the drift from it
  (the torch trainer's behaviour).
- ``always``, or some rows without logprobs: verl recomputes ``pi_old`` with the actor's weights at
  the start of each PPO step; with the default of one PPO step over all rows that is the starting
  weights (the torch trainer's ``always``), and the behaviour-to-start gap is treated as on-policy,
  not corrected. Where every row has stored logprobs they are still returned, and verl reports the
  gap as ``training/rollout_probs_diff_*``.
- verl's actor ignores ``pi_old`` altogether when a PPO step is a single mini-batch and a single
  epoch (``on_policy`` in ``dp_actor.update_policy``): the ratio is 1 and nothing is clipped.

verl computes training logprobs with the logits divided by ``actor_rollout_ref.rollout.temperature``,
one temperature for the whole job, which the job sets to the one temperature its rows were sampled at
(``verl_backend.replay_temperature`` refuses a mix). Data sampled with top-p/top-k truncation, or by
another model version, is off-policy by that difference here; the torch trainer is the one that weighs
or drops it (its ``sampling`` and ``off_policy`` settings).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, TypedDict

__all__ = ["AGENT_LOOP_NAME", "REPLAY_COLUMN", "ReplayOutputFields", "ReplayRowError", "replay_output_fields"]

AGENT_LOOP_NAME = "tracelearn_replay"
# The dataset column holding the stored tokens (tracelearn.pipelines.export_verl.REPLAY_COLUMN; a test
# keeps the two equal, this file cannot import tracelearn).
REPLAY_COLUMN = "tracelearn_replay"
# verl counts the turns for its metrics only; a replayed call is one user and one assistant turn,
# as in verl's own single-turn loop.
REPLAYED_TURNS = 2


class ReplayRowError(ValueError):
    """A replay row cannot be returned to verl: names the row (span, trace) and the field."""


class ReplayOutputFields(TypedDict):
    """The ``AgentLoopOutput`` fields of one replayed transition."""

    prompt_ids: list[int]
    response_ids: list[int]
    response_mask: list[int]
    response_logprobs: list[float] | None
    reward_score: float
    num_turns: int


def _row_name(row: Mapping[str, Any]) -> str:
    info = row.get("extra_info")
    if isinstance(info, Mapping) and info.get("span_id"):
        return f"replay row of span {info['span_id']} (trace {info.get('trace_id')}, task {info.get('task_id')})"
    return "replay row without extra_info.span_id"


def _values(stored: Mapping[str, Any], field: str, where: str) -> list[Any]:
    values = stored.get(field)
    if values is None:
        raise ReplayRowError(
            f"{where}: {REPLAY_COLUMN}.{field} is missing; replay needs the token ids, mask and logprobs captured "
            "from the model server (export with tracelearn.pipelines.export_verl.to_verl_replay)"
        )
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise ReplayRowError(f"{where}: {field} is {type(values).__name__}, expected a list")
    return list(values)


def _token_ids(stored: Mapping[str, Any], field: str, where: str) -> list[int]:
    ids = [int(token) for token in _values(stored, field, where)]
    if not ids:
        raise ReplayRowError(f"{where}: {REPLAY_COLUMN}.{field} is empty; a replayed call needs at least one token")
    return ids


def replay_output_fields(row: Mapping[str, Any], *, with_logprobs: bool) -> ReplayOutputFields:
    """The stored tokens of ``row`` (a verl-replay row as verl's dataset yields it) as output fields.

    Reads ``row["tracelearn_replay"]``: ``prompt_ids``, ``response_ids`` and ``response_mask`` are
    returned as stored; the ``response_logprobs`` too when ``with_logprobs`` (then every row must
    have them: verl stacks the whole batch's logprobs or none), else None; ``reward_score`` is the
    stored ``advantage`` (see the module docstring). Raises :class:`ReplayRowError` naming the row for
    a missing column, missing or empty token ids, a mask or logprobs whose length differs from the
    response, a mask value other than 0 or 1, and a missing or non-finite advantage.
    """
    where = _row_name(row)
    stored = row.get(REPLAY_COLUMN)
    if not isinstance(stored, Mapping):
        raise ReplayRowError(
            f"{where}: no {REPLAY_COLUMN} column (got {type(stored).__name__}); the training file must be a "
            "verl-replay export (tracelearn.pipelines.export_verl.to_verl_replay)"
        )
    prompt_ids = _token_ids(stored, "prompt_ids", where)
    response_ids = _token_ids(stored, "response_ids", where)
    response_mask = [int(flag) for flag in _values(stored, "response_mask", where)]
    if len(response_mask) != len(response_ids):
        raise ReplayRowError(
            f"{where}: response_mask has {len(response_mask)} entries for {len(response_ids)} response tokens"
        )
    if any(flag not in (0, 1) for flag in response_mask):
        raise ReplayRowError(f"{where}: response_mask holds values other than 0 and 1")
    response_logprobs = None
    if with_logprobs:
        response_logprobs = [float(value) for value in _values(stored, "response_logprobs", where)]
        if len(response_logprobs) != len(response_ids):
            raise ReplayRowError(
                f"{where}: response_logprobs has {len(response_logprobs)} entries for "
                f"{len(response_ids)} response tokens"
            )
    advantage = stored.get("advantage")
    if advantage is None or not math.isfinite(float(advantage)):
        raise ReplayRowError(
            f"{where}: advantage is {advantage!r}; rebuild the transitions so that every replayed call has one"
        )
    return ReplayOutputFields(
        prompt_ids=prompt_ids,
        response_ids=response_ids,
        response_mask=response_mask,
        response_logprobs=response_logprobs,
        reward_score=float(advantage),
        num_turns=REPLAYED_TURNS,
    )


try:
    from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput
except ImportError:
    # Outside verl's environment (tracelearn's own, the tests): only the pure function above exists.
    pass
else:
    # Not decorated with verl's ``register``: the job's agent_loop.yaml registers it under AGENT_LOOP_NAME
    # with ``replay_logprobs``, and ``register`` would replace that entry (without the argument) as soon
    # as verl imported this module for the first row, so every later row would drop its logprobs.
    class ReplayAgentLoop(AgentLoopBase):  # type: ignore[misc]  # verl is untyped
        """Returns the stored transition of the row it is given; never calls the inference server."""

        def __init__(self, *args: Any, replay_logprobs: bool = False, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.replay_logprobs = replay_logprobs

        async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> Any:
            fields = replay_output_fields(kwargs, with_logprobs=self.replay_logprobs)
            # Metrics default to "not measured" (no generation happened).
            return AgentLoopOutput(**fields, metrics={})
