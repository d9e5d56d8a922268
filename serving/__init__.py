"""Embedded OpenAI-compatible model server (transformers on CPU or CUDA) and the default model store.

Serves ``/v1/chat/completions`` and ``/v1/models`` and returns token ids and logprobs in vLLM's
shape, so captured data is exact. May import: torch, transformers, fastapi, uvicorn,
tracelearn.schemas, tracelearn.registry. Must never import training or pipelines.
"""
