"""Landing spans as Parquet: span normalization into the spans table, the atomic partitioned file
writer, the in-process OpenTelemetry exporter, and (later) the OTLP receiver sidecar and compaction.

May import: tracelearn.schemas, pyarrow, opentelemetry. Must never import polars, torch or airflow.
"""
