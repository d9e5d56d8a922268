"""``tracelearn transitions ...``: build RL transitions from a spans dataset."""

import dataclasses
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from tracelearn.pipelines.build import BuildResult, build_transitions
from tracelearn.pipelines.config import PipelineConfigError, WatermarkConfig, load_config
from tracelearn.pipelines.stages import StageError
from tracelearn.schemas.dataset import DatasetError
from tracelearn.schemas.migrations import SchemaVersionError

SUMMARY_ROWS: tuple[tuple[str, str], ...] = (
    ("rollouts built", "rollouts"),
    ("rollouts deferred (watermark)", "deferred"),
    ("rollouts dropped without reward", "dropped_without_reward"),
    ("transitions", "transitions"),
    ("transitions missing token ids", "without_token_ids"),
    ("advantage groups", "groups"),
    ("zero-signal groups", "zero_signal_groups"),
    ("orphan spans", "orphan_spans"),
    ("files written", "files_written"),
)


@click.group()
def transitions() -> None:
    """Build and inspect RL transitions."""


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


@transitions.command("build")
@click.option("--spans", "spans_path", required=True, type=click.Path(path_type=Path), help="Data root or spans/.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output root (transitions/, rollouts/).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None, help="pipeline.yaml.")
@click.option("--date", default=None, help="Only this spans date partition (YYYY-MM-DD).")
@click.option(
    "--lateness-seconds",
    type=click.FloatRange(min=0),
    default=None,
    help="Watermark lateness, overriding the config's watermark.lateness_seconds.",
)
def build_command(
    spans_path: Path, out: Path, config_path: Path | None, date: str | None, lateness_seconds: float | None
) -> None:
    """Build rollouts and credited transitions from SPANS into OUT (reruns replace, never duplicate)."""
    try:
        config = load_config(config_path)
        if lateness_seconds is not None:
            config = dataclasses.replace(config, watermark=WatermarkConfig(lateness_seconds))
        result = build_transitions(spans_path, out, config, date=date)
    except PipelineConfigError as exc:
        raise click.ClickException(f"invalid pipeline config: {exc}") from exc
    except (StageError, DatasetError, SchemaVersionError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    render_build(result, Console())
