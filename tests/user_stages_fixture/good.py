"""Valid user stages and a reward function, referenced as ``user_stages_fixture.good:NAME``."""

import polars as pl


def keep_agent(lf: pl.LazyFrame, agent: str, column: str = "agent_name") -> pl.LazyFrame:
    """Keep the calls of one agent. Reads ``column``; adds nothing."""
    return lf.filter(pl.col(column) == agent)


def add_length(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Add ``prompt_length``. Reads ``prompt_messages``."""
    return lf.with_columns(pl.col("prompt_messages").str.len_chars().alias("prompt_length"))


def drop_reward(lf: pl.LazyFrame) -> pl.LazyFrame:
    """A stage that (wrongly) drops the ``reward`` column."""
    return lf.drop("reward")


def returns_dataframe(lf: pl.LazyFrame) -> pl.DataFrame:
    """A stage that (wrongly) collects and returns a DataFrame."""
    return lf.collect()


def score(answer: str, gold: str) -> float:
    """A reward function: 1.0 when the answer equals the gold answer."""
    return float(answer.strip() == gold.strip())


NOT_CALLABLE = 42
