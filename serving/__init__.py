"""Serving the policy: the embedded OpenAI-compatible model server, the vLLM launcher, and the gateway.

The embedded server (transformers on CPU or CUDA) serves ``/v1/chat/completions`` and ``/v1/models``
and returns token ids and logprobs in vLLM's shape, so captured data is exact; it can follow a
registry alias and swap versions under load (``alias_follower``). ``vllm_server`` launches vLLM for
GPU machines and moves it to new registry versions. ``gateway`` is a proxy in front of any upstream
that records each call as a span with token ids and can substitute registry prompts.

May import: torch, transformers, peft, fastapi, uvicorn, httpx, tracelearn.schemas, tracelearn.storage,
tracelearn.settings, tracelearn.processes, tracelearn.instrumentation (the gateway reuses the token-id
capture), tracelearn.models (finding and loading a model, shared with training), tracelearn.registry.
Must never import training or pipelines.
"""
