"""Entry point of the ``tracelearn`` command: one click group, subcommand groups registered lazily."""

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tracelearn")
def main() -> None:
    """tracelearn: make any AI agent learn from its own runs."""
