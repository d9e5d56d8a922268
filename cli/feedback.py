"""``tracelearn feedback ...``: append late rewards to a data root's feedback table."""

import json
from pathlib import Path

import click

from tracelearn.collector.feedback import FeedbackError, FeedbackItem, append_feedback, feedback_item


@click.group()
def feedback() -> None:
    """Late rewards (thumbs-up, grader scores) joined to rollouts by the pipeline."""


def _report(files: list[Path], count: int) -> None:
    click.echo(f"{count} feedback rows written to {', '.join(str(f) for f in files)}")


@feedback.command("add")
@click.argument("data", type=click.Path(file_okay=False, path_type=Path))
@click.option("--rollout-id", help="The rollout the feedback is about.")
@click.option("--trace-id", help="The trace the feedback is about (32 hex digits).")
@click.option("--name", required=True, help="Reward name, e.g. thumbs_up.")
@click.option("--value", required=True, type=float, help="Reward value (finite).")
@click.option("--source", help="Who gave it (user, grader name, ...).")
def add(data: Path, rollout_id: str | None, trace_id: str | None, name: str, value: float, source: str | None) -> None:
    """Append one feedback row to DATA/feedback."""
    raw = {"rollout_id": rollout_id, "trace_id": trace_id, "name": name, "value": value, "source": source}
    try:
        item = feedback_item(raw, "feedback")
    except FeedbackError as exc:
        raise click.ClickException(str(exc)) from None
    _report(append_feedback(data, [item]), 1)


@feedback.command("import")
@click.argument("data", type=click.Path(file_okay=False, path_type=Path))
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def import_(data: Path, file: Path) -> None:
    """Append the feedback rows of a JSON Lines FILE (one object per line) to DATA/feedback.

    Every line is checked first; a bad line writes nothing and is named in the error.
    """
    items: list[FeedbackItem] = []
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{file}:{number}"
            try:
                raw = json.loads(line)
            except ValueError as exc:
                raise click.ClickException(f"{where}: not valid JSON ({exc})") from None
            if not isinstance(raw, dict):
                raise click.ClickException(f"{where}: must be a JSON object, not {type(raw).__name__}")
            try:
                items.append(feedback_item(raw, where))
            except FeedbackError as exc:
                raise click.ClickException(str(exc)) from None
    if not items:
        raise click.ClickException(f"{file}: no feedback rows")
    _report(append_feedback(data, items), len(items))
