"""The ``tracelearn`` command line. Each subcommand group lives in its own module and imports its
heavy dependencies lazily, so ``tracelearn --help`` stays fast.

The outermost layer, with the DAGs: a command is one library call plus rendering. May import any
tracelearn package but the DAG files; nothing in the library imports it.
"""

from tracelearn.cli.main import main

__all__ = ["main"]
