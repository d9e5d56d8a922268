"""Arrow schemas of every table, their versions and migrations, and the attribute-name constants.

This is the bottom of the dependency graph: it may import pyarrow and the standard library only,
and nothing else in tracelearn imports into it.
"""
