"""Pipeline stages: built-ins on small frames, user stages by import path, validation at load."""

import polars as pl
import pytest

from tracelearn.pipelines.stages import (
    BUILTIN_STAGES,
    StageError,
    StageSpec,
    resolve_stage,
    resolve_stages,
    run_stages,
)

REQUIRED = ("rollout_id", "step_index", "reward")


def transitions() -> pl.LazyFrame:
    return pl.LazyFrame(
        {
            "rollout_id": ["r1", "r1", "r2", "r3", "r4"],
            "step_index": [0, 1, 0, 0, 0],
            "task_id": ["t1", "t1", "t1", "t1", "t2"],
            "agent_name": ["writer", "planner", "writer", "writer", "writer"],
            "prompt_messages": ["p", "q", "p", None, "p"],
            "response_token_ids": [[1, 2], [1, 2, 3], None, [1], []],
            "reward": [1.0, 1.0, 0.0, None, 0.5],
            "rollout_status": ["ok", "ok", "error", "incomplete", "ok"],
            "zero_signal": [False, False, False, True, None],
        }
    )


def apply(name: str, **params: object) -> pl.DataFrame:
    stage = resolve_stage(StageSpec(name, dict(params)))
    return run_stages(transitions(), [stage], REQUIRED).collect()


def test_drop_failed_rollouts_keeps_ok_rollouts_and_optionally_incomplete() -> None:
    assert apply("drop_failed_rollouts")["rollout_id"].to_list() == ["r1", "r1", "r4"]
    assert apply("drop_failed_rollouts", keep_incomplete=True)["rollout_id"].to_list() == ["r1", "r1", "r3", "r4"]


def test_drop_zero_signal_groups_drops_rows_flagged_zero_signal() -> None:
    assert apply("drop_zero_signal_groups")["rollout_id"].to_list() == ["r1", "r1", "r2", "r4"]


def test_dedupe_by_prompt_within_task_first_or_last_keeping_null_prompts() -> None:
    first = apply("dedupe_by_prompt")
    assert first.select("rollout_id", "step_index").rows() == [("r1", 0), ("r1", 1), ("r3", 0), ("r4", 0)]
    last = apply("dedupe_by_prompt", keep="last")
    assert last.select("rollout_id", "step_index").rows() == [("r1", 1), ("r2", 0), ("r3", 0), ("r4", 0)]


def test_min_reward_drops_low_and_missing_rewards() -> None:
    assert apply("min_reward", threshold=0.5)["rollout_id"].to_list() == ["r1", "r1", "r4"]


def test_max_response_tokens_drops_long_responses_and_keeps_unknown_lengths() -> None:
    kept = apply("max_response_tokens", n=2)
    assert kept.select("rollout_id", "step_index").rows() == [("r1", 0), ("r2", 0), ("r3", 0), ("r4", 0)]


def test_user_stage_from_module_path_with_params() -> None:
    stages = resolve_stages(
        [
            "drop_failed_rollouts",
            StageSpec("user_stages_fixture.good:keep_agent", {"agent": "writer"}),
            "user_stages_fixture.good:add_length",
        ]
    )
    out = run_stages(transitions(), stages, REQUIRED).collect()
    assert out["rollout_id"].to_list() == ["r1", "r4"]
    assert out["prompt_length"].to_list() == [1, 1]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (StageSpec("drop_failed_rollout"), "did you mean drop_failed_rollouts"),
        (StageSpec("no_such_stage"), "is not a built-in stage"),
        (StageSpec("user_stages_fixture.good:"), "malformed import path"),
        (
            StageSpec("user_stages_fixture.missing_module:fn"),
            "module 'user_stages_fixture.missing_module' cannot be imported",
        ),
        (StageSpec("user_stages_fixture.broken:fn"), "not_an_installed_module_for_tracelearn_tests"),
        (StageSpec("user_stages_fixture.good:nope"), "has no attribute 'nope'"),
        (StageSpec("user_stages_fixture.good:NOT_CALLABLE"), "is a int, not a function"),
        (StageSpec("user_stages_fixture.bad_signature:no_frame"), "takes no positional parameter"),
        (StageSpec("user_stages_fixture.bad_signature:needs_threshold"), "missing a required argument: 'threshold'"),
        (StageSpec("user_stages_fixture.good:add_length", {"keep": "last"}), "unexpected keyword argument 'keep'"),
        (StageSpec("dedupe_by_prompt", {"keep": "middle"}), "keep='middle' is unknown; use one of first, last"),
        (StageSpec("min_reward"), "missing a required argument: 'threshold'"),
        (StageSpec("max_response_tokens", {"n": -1}), "n=-1 must be an integer >= 0"),
    ],
)
def test_stage_validation_errors_name_the_stage_and_the_problem(spec: StageSpec, expected: str) -> None:
    with pytest.raises(StageError) as error:
        resolve_stage(spec)
    message = str(error.value)
    assert expected in message
    assert spec.name.split(":")[0] in message


def test_stage_that_drops_a_required_column_is_caught_before_collecting() -> None:
    batches_read: list[int] = []

    def count_reads(df: pl.DataFrame) -> pl.DataFrame:
        batches_read.append(df.height)
        return df

    stages = resolve_stages(["drop_failed_rollouts", "user_stages_fixture.good:drop_reward"])
    with pytest.raises(StageError, match=r"'user_stages_fixture.good:drop_reward' dropped required column\(s\) reward"):
        run_stages(transitions().map_batches(count_reads), stages, REQUIRED)
    assert batches_read == []


def test_stage_returning_a_dataframe_is_rejected() -> None:
    stage = resolve_stage("user_stages_fixture.good:returns_dataframe")
    with pytest.raises(StageError, match="returned DataFrame, not a polars LazyFrame"):
        run_stages(transitions(), [stage], REQUIRED)


def test_stage_reading_a_missing_column_fails_on_the_schema() -> None:
    stage = resolve_stage("drop_failed_rollouts")
    with pytest.raises(StageError, match="stage 'drop_failed_rollouts' builds an invalid plan"):
        run_stages(transitions().drop("rollout_status"), [stage], REQUIRED)


def test_every_builtin_has_a_docstring_naming_what_it_reads() -> None:
    for name, function in BUILTIN_STAGES.items():
        assert function.__doc__ and "Reads" in function.__doc__, name
