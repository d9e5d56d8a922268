"""Experience pipeline: spans -> rollouts -> credited RL transitions (polars LazyFrames).

May import: tracelearn.schemas, tracelearn.storage (atomic Parquet writes), tracelearn.settings,
tracelearn.collector (the spool's segment names, to count what is not yet Parquet), tracelearn.processes
(the reward function's worker process), polars, pyarrow. Must never import training, serving or airflow
(the DAG files in ``pipelines/dags/`` import this package, not the other way round).
"""
