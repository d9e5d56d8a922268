"""Durable files: what every part that writes to disk shares, below all of them.

``atomic_files``: the directory fsync that makes a rename durable, hive partition paths and safe path
segments, the writer identity in temp file names and the cleanup of temp files a dead writer left.
``atomic_parquet``: a Parquet file written under a temp name, fsynced and renamed into place, in one
go or row group by row group. The collector, the pipelines, training and the registry use them.

Beside ``tracelearn.schemas`` at the bottom of the dependency graph, and apart from it: schemas say
what a table is, storage makes bytes land whole.

May import: the standard library and pyarrow. Must never import any other tracelearn package.
"""
