"""``tracelearn transitions export``: transitions -> verl's RL, SFT or replay Parquet files."""

from pathlib import Path

import click
from rich.console import Console

from tracelearn.pipelines.export_verl import (
    DEFAULT_DATA_SOURCE,
    ExportError,
    VerlExport,
    load_transitions,
    to_verl_replay,
    to_verl_rl,
    to_verl_sft,
    write_verl_export,
)
from tracelearn.schemas.migrations import SchemaVersionError

FORMATS = ("verl-rl", "verl-sft", "verl-replay")
# Bad rows listed one by one before the rest are only counted.
BAD_ROWS_SHOWN = 10


def render_export(export: VerlExport, files: list[Path], console: Console) -> None:
    """Print rows written per split, rows skipped and why, the bad rows, then the files."""
    for name, rows in export.splits.items():
        console.print(f"written {name}: {rows.height}")
    for reason, count in export.skipped.items():
        console.print(f"skipped {reason}: {count}")
    for bad in export.bad_messages[:BAD_ROWS_SHOWN]:
        console.print(f"  bad messages in trace {bad.trace_id} span {bad.span_id}: {bad.error}", markup=False)
    if len(export.bad_messages) > BAD_ROWS_SHOWN:
        console.print(f"  ... and {len(export.bad_messages) - BAD_ROWS_SHOWN} more")
    for path in files:
        console.print(f"wrote {path}")


@click.command("export")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--format", "export_format", required=True, type=click.Choice(FORMATS), help="Trainer format.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory for train/val.parquet.")
@click.option("--config-hash", "config_hash_prefix", default=None, help="Pipeline config hash (a prefix will do).")
@click.option("--val-fraction", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.1, show_default=True)
@click.option("--min-reward", type=float, default=None, help="verl-sft: keep only transitions with reward >= X.")
@click.option("--data-source", default=DEFAULT_DATA_SOURCE, show_default=True, help="verl's data_source column.")
def export_command(
    path: Path,
    export_format: str,
    out: Path,
    config_hash_prefix: str | None,
    val_fraction: float,
    min_reward: float | None,
    data_source: str,
) -> None:
    """Export the transitions under PATH (build output root or its transitions/) for a trainer."""
    if min_reward is not None and export_format != "verl-sft":
        raise click.UsageError("--min-reward applies to --format verl-sft only")
    try:
        transitions = load_transitions(path, config_hash_prefix)
        if export_format == "verl-rl":
            export = to_verl_rl(transitions, val_fraction, data_source)
        elif export_format == "verl-replay":
            export = to_verl_replay(transitions, val_fraction, data_source)
        else:
            export = to_verl_sft(transitions, min_reward, val_fraction, data_source)
        files = write_verl_export(export, out)
    except (ExportError, SchemaVersionError) as exc:
        raise click.ClickException(str(exc)) from exc
    render_export(export, files, Console())
