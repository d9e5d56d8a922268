"""``tracelearn spans ...``: look at a captured spans dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tracelearn.collector.compaction import (
    MIB,
    MIN_AGE_SECONDS,
    CompactionError,
    CompactionEvent,
    CompactionReport,
    Step,
    compact,
    spans_table_root,
)
from tracelearn.collector.settings import CaptureSettings
from tracelearn.collector.spool import SPOOL_DIR, ReplayReport, pending_segments, replay_spools
from tracelearn.pipelines.span_summary import SpanStats, read_prepared_spans, spans_stats
from tracelearn.pipelines.spans_input import spans_location
from tracelearn.pipelines.stats import span_analysis
from tracelearn.schemas.dataset import DatasetError
from tracelearn.schemas.migrations import SchemaVersionError
from tracelearn.schemas.tables import SPANS
from tracelearn.settings import SettingError
from tracelearn.settings.variables import DATA_ROOT

if TYPE_CHECKING:
    from tracelearn.pipelines.stats import SpanAnalysis


@click.group()
def spans() -> None:
    """Inspect captured spans."""


def render_stats(stats: SpanStats, console: Console) -> None:
    overview = Table(title="spans dataset", show_header=False)
    overview.add_column("what")
    overview.add_column("value", justify="right")
    rows = [
        ("files", stats.files),
        ("spans", stats.spans),
        ("rollouts", stats.rollouts),
        ("  joined by", ", ".join(f"{k}: {v}" for k, v in stats.rollouts_by_identity.items()) or "-"),
        ("tasks", stats.tasks),
        ("services", ", ".join(stats.services) or "-"),
        ("time range", f"{stats.first_span or '-'} .. {stats.last_span or '-'}"),
        ("LLM calls", stats.llm_calls),
        ("tool calls", stats.tool_calls),
        ("spans with errors", stats.errors),
        ("input / output tokens", f"{stats.input_tokens} / {stats.output_tokens}"),
        ("token ids (LLM calls)", ", ".join(f"{k}: {v}" for k, v in sorted(stats.token_ids_status.items())) or "-"),
        ("rollouts with a reward", stats.rollouts_with_reward),
        (
            "spooled, not yet in Parquet",
            f"{stats.spool_segments} segments ({stats.spool_bytes / 1024:.0f} KiB)" if stats.spool_segments else "-",
        ),
        ("mean primary reward", "-" if stats.mean_primary_reward is None else f"{stats.mean_primary_reward:.3f}"),
    ]
    for name, value in rows:
        overview.add_row(name, str(value))
    console.print(overview)
    if stats.by_agent_model:
        table = Table(title="LLM calls per agent and model")
        for column in ("agent", "model", "calls", "input tokens", "output tokens", "with token ids"):
            table.add_column(column, justify="left" if column in ("agent", "model") else "right")
        for group in stats.by_agent_model:
            table.add_row(
                group.agent,
                group.model,
                str(group.llm_calls),
                str(group.input_tokens),
                str(group.output_tokens),
                str(group.with_token_ids),
            )
        console.print(table)
    if stats.other_spans_by_scope:
        table = Table(title="spans not understood (type other), by instrumentation scope")
        table.add_column("scope")
        table.add_column("spans", justify="right")
        for scope, count in stats.other_spans_by_scope.items():
            table.add_row(scope, str(count))
        console.print(table)
    if stats.rewards:
        table = Table(title="rewards")
        for column in ("name", "count", "mean", "primary"):
            table.add_column(column, justify="left" if column == "name" else "right")
        for reward in stats.rewards:
            mean = "-" if reward.mean is None else f"{reward.mean:.3f}"
            table.add_row(reward.name, str(reward.count), mean, str(reward.primary_count))
        console.print(table)


def render_analysis(analysis: SpanAnalysis, console: Console) -> None:
    """Print rewards and latency per agent, token lengths per agent, and rewards per task."""
    from tracelearn.cli.transitions import render_frame

    by_agent = analysis.by_agent
    rewards = ("llm_calls", "rollouts", "reward_mean", "reward_std", "latency_ms_mean", "latency_ms_p95")
    render_frame(by_agent.select("agent", *rewards), "rewards and latency per agent", console)
    tokens = [name for name in by_agent.columns if name.startswith(("input_tokens", "output_tokens"))]
    render_frame(by_agent.select("agent", *tokens), "tokens per LLM call, per agent", console)
    render_frame(analysis.by_task, "per task", console)


@spans.command("stats")
@click.argument("data", type=click.Path(path_type=Path), default=None, required=False, envvar=DATA_ROOT.name)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="Write a PNG report here.")
def stats_command(data: Path | None, as_json: bool, plot_path: Path | None) -> None:
    """What was captured under DATA (default $TRACELEARN_DATA): rollouts, LLM calls, tokens, rewards.

    Counted as a build counts: rollouts as the pipeline forms them (and the rule that joined each),
    an LLM call seen by two instrumentations once; also rewards, latency and tokens per agent and
    per task, and the spans of unknown conventions by instrumentation scope.
    """
    if data is None:
        raise click.UsageError("give the data directory, or set TRACELEARN_DATA")
    try:
        dataset = read_prepared_spans(data)
        stats = spans_stats(data, dataset)
        analysis = span_analysis(dataset.prepared) if dataset.prepared is not None else None
    except (DatasetError, SchemaVersionError) as exc:
        raise click.ClickException(str(exc)) from exc
    if plot_path is not None and analysis is not None:
        from tracelearn.pipelines.plots import PlotError, plot_spans

        try:
            plot_spans(analysis, plot_path)
        except PlotError as exc:
            raise click.ClickException(str(exc)) from exc
    if as_json:
        figures = stats.to_dict()
        if analysis is not None:
            figures.update(analysis.to_dict())
        click.echo(json.dumps(figures, indent=2))
        return
    console = Console()
    render_stats(stats, console)
    if analysis is not None:
        render_analysis(analysis, console)
    if plot_path is not None and analysis is not None:
        console.print(f"wrote {plot_path}")


def render_compaction(report: CompactionReport, root: Path, console: Console) -> None:
    """Print what a compaction did (or would do): figures, then the files it left alone and why."""

    def shown(path: Path) -> str:
        return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)

    title = "compaction plan (dry run: nothing written)" if report.dry_run else "compaction"
    overview = Table(title=title, show_header=False)
    overview.add_column("what")
    overview.add_column("value", justify="right")
    mib = f"{report.bytes_before / MIB:.2f} MiB"
    if report.dry_run:
        rows = [
            ("partitions", len(report.partitions)),
            ("files to read", report.files_read),
            ("rows to read", report.rows_in),
            ("files to write", len(report.planned)),
            ("size on disk of the inputs", mib),
            ("interrupted compactions to finish first", len(report.pending_journals)),
        ]
    else:
        rows = [
            ("partitions", len(report.partitions)),
            ("files read", report.files_read),
            ("rows in / out", f"{report.rows_in} / {report.rows_out}"),
            ("duplicates removed", report.duplicates_removed),
            ("files written", len(report.files_written)),
            ("size on disk before / after", f"{mib} / {report.bytes_after / MIB:.2f} MiB"),
            ("interrupted compactions finished", len(report.recovered)),
        ]
    rows.append(("files left as they are", len(report.skipped)))
    for name, value in rows:
        overview.add_row(name, str(value))
    console.print(overview)
    for line in report.recovered:
        console.print(f"recovered: {line}", markup=False, highlight=False)
    for path in report.files_written:
        console.print(f"wrote {shown(path)}", markup=False, highlight=False, soft_wrap=True)
    if report.skipped:
        skipped = Table(title="left as they are")
        skipped.add_column("file", overflow="fold")
        skipped.add_column("why")
        for item in report.skipped:
            skipped.add_row(shown(item.path), item.reason)
        console.print(skipped)


@spans.command("compact")
@click.argument("data", type=click.Path(path_type=Path), default=None, required=False, envvar=DATA_ROOT.name)
@click.option("--date", required=True, help="The date=YYYY-MM-DD partition to compact.")
@click.option("--service", default=None, help="Only this service's partition (default: every service of the date).")
@click.option(
    "--target-mb",
    type=click.FloatRange(min=0, min_open=True),
    default=128,
    show_default=True,
    help="Largest output file, uncompressed MiB (estimated from the Parquet metadata).",
)
@click.option(
    "--min-age-seconds",
    type=click.FloatRange(min=0),
    default=MIN_AGE_SECONDS,
    show_default=True,
    help="Leave files modified more recently than this.",
)
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
def compact_command(
    data: Path | None, date: str, service: str | None, target_mb: float, min_age_seconds: float, dry_run: bool
) -> None:
    """Merge the small span files of one date under DATA (default $TRACELEARN_DATA) into large ones.

    Safe while the collector writes: files still being written, newer than --min-age-seconds, or
    still in the spool are left alone; a crashed run is finished by the next one.
    """
    if data is None:
        raise click.UsageError("give the data directory, or set TRACELEARN_DATA")
    try:
        compression = CaptureSettings.from_env().compression
    except SettingError as exc:
        raise click.ClickException(str(exc)) from exc
    console = Console()
    columns = (TextColumn("compacting"), BarColumn(), DownloadColumn(), TimeElapsedColumn())
    # Off when the output is not a terminal (a log, a pipe): there the bar would only add blank lines.
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("compacting", total=0)

        def show(event: CompactionEvent) -> None:
            if event.step == Step.PLANNED:
                progress.update(task, total=(progress.tasks[0].total or 0) + event.nbytes)
            elif event.step == Step.INPUT_READ:
                progress.advance(task, event.nbytes)

        try:
            report = compact(
                data,
                date,
                service,
                target_bytes=int(target_mb * MIB),
                min_age_seconds=min_age_seconds,
                compression=compression,
                dry_run=dry_run,
                on_event=show,
            )
        except (CompactionError, OSError) as exc:
            raise click.ClickException(str(exc)) from exc
    render_compaction(report, spans_table_root(data), console)


def render_replay(report: ReplayReport, left: int, console: Console) -> None:
    """Print what a spool replay wrote, and how many segments it left to a live writer."""
    console.print(
        f"replayed {report.segments} spool segment(s): {report.rows} spans written to Parquet, "
        f"{report.duplicates} duplicates dropped, {report.torn_tails} torn tail(s) cut",
        highlight=False,
    )
    for path in report.files:
        console.print(f"wrote {path}", markup=False, highlight=False, soft_wrap=True)
    if left:
        console.print(
            f"{left} segment(s) left: their writer is still running (or runs on another host) and rolls them itself",
            highlight=False,
        )


@spans.command("replay")
@click.argument("data", type=click.Path(path_type=Path), default=None, required=False, envvar=DATA_ROOT.name)
def replay_command(data: Path | None) -> None:
    """Turn the spool of processes that died under DATA (default $TRACELEARN_DATA) into Parquet.

    Spans a process flushed but had not rolled into Parquet when it died (kill -9, a crash) wait in
    DATA/spans/_spool; the next capture process on the host replays them, this command does it now.
    Segments of live writers are left alone; a rerun writes nothing twice.
    """
    if data is None:
        raise click.UsageError("give the data directory, or set TRACELEARN_DATA")
    root = Path(spans_location(data))
    if not root.is_dir():
        raise click.ClickException(f"{root}: no such directory")
    try:
        compression = CaptureSettings.from_env().compression
        report = replay_spools(root, SPANS, compression)
    except SettingError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(f"replaying the spool under {root} failed: {exc}") from exc
    left = len(pending_segments(root / SPOOL_DIR))
    render_replay(report, left, Console())
