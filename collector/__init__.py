"""Landing spans as Parquet: span normalization into the spans table, the write-ahead spool (appended
and fsynced at the end of every rollout, replayed after a crash), the atomic partitioned file writer
that rolls buffered rows into Parquet files, the in-process OpenTelemetry exporter, and (later) the
OTLP receiver sidecar and compaction.

May import: tracelearn.schemas, pyarrow, opentelemetry. Must never import polars, torch or airflow.
"""
