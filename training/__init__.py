"""Training: GRPO and SFT trainers (torch), the verl backend, evaluation and the promotion gate.

Data contract: the transitions table (``tracelearn.pipelines``) is the only input; every trainer
reads the stored prompt/response token ids, logprobs, advantages and loss masks as generated.

- ``config``: ``train.yaml`` (GRPO, SFT, LoRA and runtime sections), validated before any model loads.
- ``sequences``: transitions -> token sequences (retokenizing only where ids are missing, counted) and
  length-bucketed micro-batches under a token budget.
- ``losses``: the clipped policy-gradient loss, the k3 KL estimate and loss aggregation, pure functions.
- ``policy``: the model being trained (full or LoRA), precision, per-token logprobs, checkpoints.
- ``grpo`` / ``sft``: the two torch trainers; ``runs``: what both do before the first step and after
  the last; ``data``: the transitions a run reads; ``run_dir``: a run's config, metrics, plot, lineage.
- ``verl_backend``: the same transitions exported for verl, and its job launched in its own environment.
- ``evaluate`` / ``gate``: score a model version by running an agent on held-out tasks; publish a
  candidate and promote it only when it beats production.

May import: tracelearn.schemas, tracelearn.storage, tracelearn.settings, tracelearn.processes,
tracelearn.instrumentation and tracelearn.collector (APO's optimizer spans), tracelearn.pipelines,
tracelearn.registry, tracelearn.models (model resolution and loading, shared with the server), torch,
transformers, peft. Must never import tracelearn.serving or airflow; evaluation starts ``tracelearn
serve`` and APO ``tracelearn gateway`` as processes.
"""
