"""The ``tracelearn`` command line. Each subcommand group lives in its own module and imports its
heavy dependencies lazily, so ``tracelearn --help`` stays fast.
"""

from tracelearn.cli.main import main

__all__ = ["main"]
