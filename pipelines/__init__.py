"""Experience pipeline: spans -> rollouts -> credited RL transitions (polars LazyFrames).

May import: tracelearn.schemas, tracelearn.processes (the reward function's worker process), polars,
pyarrow. Must never import training, serving or airflow
(the DAG files in ``pipelines/dags/`` import this package, not the other way round).
"""
