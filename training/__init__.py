"""Training: GRPO and SFT trainers (torch), the verl backend, APO and evaluation.

May import: tracelearn.schemas, tracelearn.pipelines, tracelearn.registry, torch, transformers.
Must never import serving internals or airflow.
"""
