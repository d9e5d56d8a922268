"""PNG reports of the dataset analysis in ``tracelearn.pipelines.stats``, drawn with matplotlib's Agg backend.

matplotlib is imported inside the functions: it is only needed by whoever asks for a plot, and the
Agg backend draws to a file without a display (servers, CI, Airflow workers).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

if TYPE_CHECKING:
    from tracelearn.pipelines.stats import SpanAnalysis

__all__ = ["PlotError", "plot_spans", "plot_transitions"]

_BINS = 20


class PlotError(RuntimeError):
    """A plot cannot be drawn or written (matplotlib missing, unwritable path)."""


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or :class:`PlotError` saying what to install."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError(
            "plots need matplotlib: pip install 'tracelearn[pipelines]' or pip install matplotlib"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _values(frame: pl.DataFrame, column: str) -> list[float]:
    return frame.get_column(column).drop_nulls().cast(pl.Float64).to_list()


def _histogram_by(axis: Any, frame: pl.DataFrame, column: str, by: str, title: str) -> None:
    """One overlaid histogram of ``column`` per value of ``by`` (a note when there is nothing to draw)."""
    drawn = False
    for (key,), part in sorted(frame.partition_by(by, as_dict=True).items(), key=lambda item: str(item[0])):
        values = _values(part, column)
        if values:
            axis.hist(values, bins=_BINS, alpha=0.5, label=str(key))
            drawn = True
    _finish(axis, title, drawn, legend=True)


def _histogram(axis: Any, series: dict[str, list[float]], title: str) -> None:
    """Overlaid histograms of the named value lists."""
    drawn = False
    for label, values in series.items():
        if values:
            axis.hist(values, bins=_BINS, alpha=0.5, label=label)
            drawn = True
    _finish(axis, title, drawn, legend=len(series) > 1)


def _finish(axis: Any, title: str, drawn: bool, legend: bool) -> None:
    axis.set_title(title)
    if not drawn:
        # An empty panel would read as "all zero"; say why it is empty instead.
        axis.text(0.5, 0.5, "no values", ha="center", va="center", transform=axis.transAxes)
    elif legend:
        axis.legend(fontsize="small")


def _save(plt: Any, figure: Any, path: Path) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, format="png", dpi=100)
    except OSError as exc:
        raise PlotError(f"{path}: cannot write the plot ({exc.strerror or exc})") from exc
    finally:
        plt.close(figure)
    return path


def plot_transitions(distributions: pl.DataFrame, groups: pl.DataFrame, path: str | Path) -> Path:
    """Write a PNG of a transitions dataset to ``path``: reward per agent, advantage, prompt and
    response token lengths, and the distinct-response ratio of the GRPO groups.

    ``distributions`` is ``tracelearn.pipelines.stats.transition_distributions``'s output (reads
    ``agent_name, reward, advantage, prompt_tokens, response_tokens``); ``groups`` is
    ``stats.groups``'s (reads ``distinct_response_ratio``). Returns ``path``; raises
    :class:`PlotError`.
    """
    plt = _pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(12, 9))
    _histogram_by(axes[0][0], distributions, "reward", "agent_name", "reward per transition, by agent")
    _histogram(axes[0][1], {"advantage": _values(distributions, "advantage")}, "advantage")
    _histogram(
        axes[1][0],
        {"prompt": _values(distributions, "prompt_tokens"), "response": _values(distributions, "response_tokens")},
        "token lengths",
    )
    _histogram(
        axes[1][1],
        {"groups": _values(groups, "distinct_response_ratio")},
        "distinct-response ratio per group (low: exploration collapse)",
    )
    axes[1][1].set_xlim(0, 1.05)  # a ratio: the full scale shows how close to collapse the groups are
    figure.tight_layout()
    return _save(plt, figure, Path(path))


def plot_spans(analysis: SpanAnalysis, path: str | Path) -> Path:
    """Write a PNG of a spans dataset to ``path``: rollout reward per agent, LLM latency, token lengths.

    Reads ``analysis.calls`` (``agent, rollout_id, final_reward, latency_ms, input_tokens,
    output_tokens``); a rollout's reward is drawn once per agent that made calls in it. Returns
    ``path``; raises :class:`PlotError`.
    """
    plt = _pyplot()
    calls = analysis.calls
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    per_rollout = calls.unique(subset=["agent", "rollout_id"], maintain_order=True)
    _histogram_by(axes[0], per_rollout, "final_reward", "agent", "rollout reward, by agent")
    _histogram_by(axes[1], calls, "latency_ms", "agent", "LLM call latency (ms), by agent")
    _histogram(
        axes[2],
        {"input": _values(calls, "input_tokens"), "output": _values(calls, "output_tokens")},
        "tokens per LLM call",
    )
    figure.tight_layout()
    return _save(plt, figure, Path(path))
