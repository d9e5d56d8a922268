"""``tracelearn spans ...``: look at a captured spans dataset."""

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from tracelearn.collector.span_stats import SpanStats, spans_stats
from tracelearn.schemas.dataset import DatasetError
from tracelearn.schemas.migrations import SchemaVersionError


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


@spans.command("stats")
@click.argument("data", type=click.Path(path_type=Path), default=None, required=False, envvar="TRACELEARN_DATA")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def stats_command(data: Path | None, as_json: bool) -> None:
    """What was captured under DATA (default $TRACELEARN_DATA): rollouts, LLM calls, tokens, rewards."""
    if data is None:
        raise click.UsageError("give the data directory, or set TRACELEARN_DATA")
    try:
        stats = spans_stats(data)
    except (DatasetError, SchemaVersionError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(stats.to_dict(), indent=2))
    else:
        render_stats(stats, Console())
