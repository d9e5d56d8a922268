"""User stages with signatures a stage cannot have."""

import polars as pl


def no_frame(*, keep: str = "first") -> pl.LazyFrame:
    """Takes no positional frame parameter."""
    raise AssertionError("never called")


def needs_threshold(lf: pl.LazyFrame, threshold: float) -> pl.LazyFrame:
    """Needs a parameter the config must give."""
    return lf
