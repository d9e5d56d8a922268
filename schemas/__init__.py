"""Arrow schemas of every table, their versions and migrations, and the attribute-name constants.

This is the bottom of the dependency graph, beside ``storage`` and ``settings``.

May import: pyarrow and the standard library only, no other tracelearn package.
"""
