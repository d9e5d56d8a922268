"""Landing spans as Parquet: span normalization into the spans table, the write-ahead spool (appended
and fsynced at the end of every rollout, replayed after a crash), the atomic partitioned file writer
that rolls buffered rows into Parquet files, the in-process OpenTelemetry exporter, the OTLP receiver
sidecar (``receiver``: admission, group commit, de-duplication; ``otlp_http`` and ``otlp_grpc``: the
protocol fronts), and compaction (a partition's small files merged into large row groups, crash-safe
next to a running writer).

May import: tracelearn.schemas, pyarrow, opentelemetry (grpc in ``otlp_grpc`` only). Must never import
polars, torch or airflow.
"""
