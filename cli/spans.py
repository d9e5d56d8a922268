"""``tracelearn spans ...``: look at a captured spans dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

from tracelearn.collector.span_stats import SpanStats, spans_stats
from tracelearn.schemas.dataset import DatasetError
from tracelearn.schemas.migrations import SchemaVersionError

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
    if stats.rewards:
        table = Table(title="rewards")
        for column in ("name", "count", "mean", "primary"):
            table.add_column(column, justify="left" if column == "name" else "right")
        for reward in stats.rewards:
            mean = "-" if reward.mean is None else f"{reward.mean:.3f}"
            table.add_row(reward.name, str(reward.count), mean, str(reward.primary_count))
        console.print(table)


def analyze_spans(data: Path, plot_path: Path | None) -> SpanAnalysis | None:
    """Per-agent and per-task figures (and the plot, when asked) if the pipelines extra is installed.

    ``None`` without polars: the base install still gets the pyarrow summary; asking for a plot
    without it is an error naming what to install.
    """
    try:
        from tracelearn.pipelines.plots import PlotError, plot_spans
        from tracelearn.pipelines.spans_input import scan_spans
        from tracelearn.pipelines.stats import span_analysis
    except ImportError as exc:
        if plot_path is not None:
            raise click.ClickException(
                f"--plot needs the pipelines extra (pip install 'tracelearn[pipelines]'): {exc}"
            ) from exc
        return None
    analysis = span_analysis(scan_spans(data))
    if plot_path is not None:
        try:
            plot_spans(analysis, plot_path)
        except PlotError as exc:
            raise click.ClickException(str(exc)) from exc
    return analysis


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
@click.argument("data", type=click.Path(path_type=Path), default=None, required=False, envvar="TRACELEARN_DATA")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="Write a PNG report here.")
def stats_command(data: Path | None, as_json: bool, plot_path: Path | None) -> None:
    """What was captured under DATA (default $TRACELEARN_DATA): rollouts, LLM calls, tokens, rewards.

    With the pipelines extra (polars) also rewards, latency and tokens per agent and per task.
    """
    if data is None:
        raise click.UsageError("give the data directory, or set TRACELEARN_DATA")
    try:
        stats = spans_stats(data)
        analysis = analyze_spans(data, plot_path) if stats.spans else None
    except (DatasetError, SchemaVersionError) as exc:
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
