"""Entry point of the ``tracelearn`` command: one click group; each subcommand lives in its own module."""

import click

from tracelearn.cli.apo import apo
from tracelearn.cli.collector import collector
from tracelearn.cli.demo import demo
from tracelearn.cli.eval import eval_command
from tracelearn.cli.feedback import feedback
from tracelearn.cli.gateway import gateway
from tracelearn.cli.registry import registry
from tracelearn.cli.serve import serve
from tracelearn.cli.spans import spans
from tracelearn.cli.train import train
from tracelearn.cli.transitions import transitions


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tracelearn")
def main() -> None:
    """tracelearn: make any AI agent learn from its own runs."""


main.add_command(apo)
main.add_command(collector)
main.add_command(demo)
main.add_command(eval_command)
main.add_command(feedback)
main.add_command(gateway)
main.add_command(registry)
main.add_command(spans)
main.add_command(serve)
main.add_command(train)
main.add_command(transitions)
