"""Entry point of the ``tracelearn`` command: one click group; each subcommand lives in its own module.

Subcommand modules are imported only when their command runs (or ``--help`` lists the commands), so
``tracelearn collector serve`` on a host with only the collector installed never imports polars,
torch or airflow, and every command starts without paying for the others' imports.
"""

import importlib
import signal
import threading
from types import FrameType

import click

# Command name -> "module:attribute" of its click command, in the order ``--help`` lists them.
COMMANDS: dict[str, str] = {
    "apo": "tracelearn.cli.apo:apo",
    "collector": "tracelearn.cli.collector:collector",
    "demo": "tracelearn.cli.demo:demo",
    "eval": "tracelearn.cli.eval:eval_command",
    "feedback": "tracelearn.cli.feedback:feedback",
    "gateway": "tracelearn.cli.gateway:gateway",
    "loop": "tracelearn.cli.loop:loop",
    "models": "tracelearn.cli.models:models",
    "registry": "tracelearn.cli.registry:registry",
    "serve": "tracelearn.cli.serve:serve",
    "spans": "tracelearn.cli.spans:spans",
    "train": "tracelearn.cli.train:train",
    "transitions": "tracelearn.cli.transitions:transitions",
}


class LazyCommands(click.Group):
    """A group whose subcommands are imported from ``COMMANDS`` when first asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, _, attribute = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            # A light install (for example only the collector) lacks what other commands need; a
            # missing module of our own is a bug and is raised as it is.
            missing = error.name or ""
            if not missing or missing.partition(".")[0] == "tracelearn":
                raise
            raise click.ClickException(
                f"`tracelearn {cmd_name}` needs {missing!r}, which is not installed here; "
                f"install it (pip install 'tracelearn[pipelines,train]' has every command's dependencies)"
            ) from None
        command = getattr(module, attribute)
        assert isinstance(command, click.Command), target
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list of ``--help``; a command this install cannot load says what it lacks."""
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names))
        rows = []
        for name in names:
            try:
                command = self.get_command(ctx, name)
            except click.ClickException as error:
                lacking = error.message.split(";")[0].removeprefix(f"`tracelearn {name}` ")
                rows.append((name, f"(unavailable: {lacking})"))
                continue
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyCommands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tracelearn")
def main() -> None:
    """tracelearn: make any AI agent learn from its own runs."""
    stop_on_sigterm_like_ctrl_c()


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_sigterm_like_ctrl_c() -> None:
    """SIGTERM stops a command as Ctrl-C does, so its ``with`` blocks stop what it started.

    Python's default for SIGTERM exits at once, skipping them: the model servers, sidecars and agents an
    evaluation or the demo started (each in its own session, out of reach of a signal to the group) kept
    running. A command that handles SIGTERM itself (``collector serve``, ``serve``, ``gateway``) replaces
    this; a process that already handles it (a test runner) keeps its own.
    """
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_interrupt)
