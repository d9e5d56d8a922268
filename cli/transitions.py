"""``tracelearn transitions ...``: build RL transitions from a spans dataset."""

import dataclasses
import json
from pathlib import Path

import click
import polars as pl
from rich.console import Console
from rich.table import Table

from tracelearn.cli.export import export_command
from tracelearn.pipelines.buckets import BUCKET_BYTES
from tracelearn.pipelines.build import BuildResult, build_transitions, spool_note
from tracelearn.pipelines.config import PipelineConfigError, WatermarkConfig, load_config
from tracelearn.pipelines.plots import PlotError, plot_transitions
from tracelearn.pipelines.stages import StageError
from tracelearn.pipelines.stats import (
    TransitionStats,
    scan_transitions,
    transition_distributions,
    transition_stats,
)
from tracelearn.schemas.dataset import DatasetError
from tracelearn.schemas.migrations import SchemaVersionError

MIB = 1024 * 1024
SUMMARY_ROWS: tuple[tuple[str, str], ...] = (
    ("rollouts built", "rollouts"),
    ("rollouts deferred (may still grow; watermark)", "deferred"),
    ("rollouts without a reward", "without_reward"),
    ("rollouts with an error", "error_rollouts"),
    ("rollouts dropped without reward", "dropped_without_reward"),
    ("rollouts rebuilt with late spans", "late_span_rollouts"),
    ("rollouts rewarded by the function", "function_rewards"),
    ("  function input missing", "function_reward_missing_input"),
    ("  function raised", "function_reward_errors"),
    ("    of which timed out", "function_reward_timeouts"),
    ("  function result not a finite number", "function_reward_invalid"),
    ("rollouts with a feedback reward", "feedback_rewards"),
    ("transitions", "transitions"),
    ("transitions missing token ids", "without_token_ids"),
    ("advantage groups", "groups"),
    ("zero-signal groups", "zero_signal_groups"),
    ("orphan spans", "orphan_spans"),
    ("buckets built", "buckets"),
    ("files written", "files_written"),
)


@click.group()
def transitions() -> None:
    """Build and inspect RL transitions."""


def render_frame(frame: pl.DataFrame, title: str, console: Console) -> None:
    """Print ``frame`` as a table: floats to 3 decimals, nulls as ``-``, numbers right-aligned."""
    table = Table(title=title)
    for name, dtype in frame.schema.items():
        # Spaces let rich wrap a long header instead of cutting it.
        table.add_column(name.replace("_", " "), justify="right" if dtype.is_numeric() else "left")
    for row in frame.iter_rows():
        table.add_row(*(_cell(value) for value in row))
    console.print(table)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def render_stats(stats: TransitionStats, console: Console) -> None:
    """Print the overview, token-id coverage, per-agent (rewards, then token lengths), per-task and group tables."""
    overview = Table(title="transitions dataset", show_header=False)
    overview.add_column("what")
    overview.add_column("value", justify="right")
    for name, value in stats.overview.row(0, named=True).items():
        overview.add_row(name.replace("_", " "), _cell(value))
    overview.add_row("config hash", stats.config_hash[:16])
    console.print(overview)
    render_frame(stats.token_ids, "token ids", console)
    rewards = ("transitions", "reward_mean", "reward_std", "credited_reward_mean", "advantage_mean", "advantage_std")
    render_frame(stats.by_agent.select("agent_name", *rewards), "rewards per agent", console)
    lengths = stats.by_agent.select("agent_name", pl.selectors.starts_with("prompt_tokens", "response_tokens"))
    render_frame(lengths, "token lengths per agent", console)
    render_frame(stats.by_task, "per task", console)
    render_frame(stats.groups, f"GRPO groups ({stats.zero_signal_groups} without learning signal)", console)


def render_build(result: BuildResult, console: Console) -> None:
    """Print the build summary as a table, then the files written."""
    table = Table(title="transitions build", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for label, key in SUMMARY_ROWS:
        table.add_row(label, str(result.summary.get(key, 0)))
    table.add_row("config hash", result.config_hash[:16])
    console.print(table)
    for path in result.transitions_files + result.rollouts_files:
        console.print(f"wrote {path}")
    for note in result.notes:
        console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)


@transitions.command("build")
# A string, not a click.Path: pathlib would fold ``s3://bucket`` into ``s3:/bucket``.
@click.option("--spans", "spans_path", required=True, help="Data root or spans/, local or s3://bucket/data.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output root (transitions/, rollouts/).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None, help="pipeline.yaml.")
@click.option("--date", default=None, help="Only this spans date partition (YYYY-MM-DD).")
@click.option(
    "--lateness-seconds",
    type=click.FloatRange(min=0),
    default=None,
    help="Watermark lateness, overriding the config's watermark.lateness_seconds.",
)
@click.option(
    "--bucket-mb",
    type=click.IntRange(min=1),
    default=BUCKET_BYTES // MIB,
    show_default=True,
    help="Hold at most about this many MiB of uncompressed spans in memory; larger datasets are built in buckets.",
)
def build_command(
    spans_path: str,
    out: Path,
    config_path: Path | None,
    date: str | None,
    lateness_seconds: float | None,
    bucket_mb: int,
) -> None:
    """Build rollouts and credited transitions from SPANS into OUT (reruns replace, never duplicate).

    SPANS is a data root or its spans/ directory, local or object storage (s3://bucket/data).
    """
    console = Console()
    try:
        config = load_config(config_path)
        if lateness_seconds is not None:
            config = dataclasses.replace(config, watermark=WatermarkConfig(lateness_seconds))
        with console.status(f"building transitions from {spans_path} ..."):
            result = build_transitions(spans_path, out, config, date=date, bucket_bytes=bucket_mb * MIB)
    except PipelineConfigError as exc:
        raise click.ClickException(f"invalid pipeline config: {exc}") from exc
    except DatasetError as exc:  # no spans Parquet files yet: maybe they are all in a dead process's spool
        note = spool_note(spans_path)
        raise click.ClickException(f"{exc}\n{note}" if note else str(exc)) from exc
    except (StageError, SchemaVersionError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:  # an unreadable object store or an unwritable output root
        raise click.ClickException(f"reading {spans_path} or writing {out} failed: {exc}") from exc
    render_build(result, console)


@transitions.command("stats")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="Write a PNG report here.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--config-hash", "config_hash", default=None, help="Prefix of the pipeline config hash to report on.")
def stats_command(path: Path, plot_path: Path | None, as_json: bool, config_hash: str | None) -> None:
    """Rewards, advantages, token lengths and zero-signal groups of the transitions under PATH.

    PATH is a build's output root (holding transitions/) or its transitions/ directory.
    """
    try:
        frame, chosen = scan_transitions(path, config_hash)
        stats = transition_stats(frame, chosen)
        if plot_path is not None:
            plot_transitions(transition_distributions(frame), stats.groups, plot_path)
    except (DatasetError, SchemaVersionError, PlotError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(stats.to_dict(), indent=2))
    else:
        render_stats(stats, Console())
    if plot_path is not None and not as_json:
        Console().print(f"wrote {plot_path}")


transitions.add_command(export_command)
