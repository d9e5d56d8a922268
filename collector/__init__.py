"""Landing spans as Parquet: span normalization into the spans table, the in-process OpenTelemetry
exporter (a write-ahead spool appended and fsynced at the end of every rollout, ``spool``,
``spool_append``, ``parquet_writer``), the OTLP receiver sidecar, and compaction (a partition's small
files merged into large row groups, crash-safe next to a running writer: ``compaction``,
``compaction_plan``, ``compaction_safety``).

The sidecar, one concern per module: ``sidecar`` (its life: bind, replay, serve, drain, close),
``otlp_http`` / ``http_bodies`` / ``otlp_grpc`` (the protocol fronts), ``receiver`` (the core they
share), ``backpressure`` (the byte-bounded queue, refusals, disk health), ``security`` (token, TLS),
``otlp_wire`` / ``otlp_validate`` / ``otlp_decode`` / ``otlp_json`` / ``otlp_spans`` (request bodies:
their layout, the checks before acknowledging, decoding into rows), ``group_commit`` and
``request_log`` (the write-ahead request log), ``dedup`` (retries, across restarts), ``maintenance``
and ``conversion`` (request logs into Parquet, off the request path), ``quarantine`` (what cannot
land, with its reason), ``metrics`` (``/metrics``, ``/status``).

May import: tracelearn.schemas, tracelearn.storage, tracelearn.settings, pyarrow, opentelemetry (grpc in
``otlp_grpc`` only). Must never import the instrumentation, pipelines, polars, torch or airflow.
"""
