"""Finding, fetching and loading a model or adapter, shared by training and serving.

- ``source``: ``ModelSource`` (the files a name resolved to) and the errors of finding and loading.
- ``resolve``: ``resolve_model``: the default model, a directory, a LoRA adapter, a ``.gguf`` file, a
  hub id in the local cache, or ``registry:NAME@ALIAS`` in the registry the caller passes.
- ``loading``: ``load_model``: weights and tokenizer on a device, a LoRA adapter merged onto its base,
  the model version (a content hash, or the registry version).
- ``default_model``: the model cache, and fetching and converting the default model once at setup
  (``tracelearn models fetch`` / ``convert``).

The registry is an argument (``resolve_model(name, registry)``), never a global this package sets.

May import: tracelearn.registry, tracelearn.settings, torch, transformers, peft, huggingface_hub, the standard
library.
Must never import serving, training, pipelines, the collector, the CLI or click.
"""

from tracelearn.models.default_model import (
    DEFAULT_MODEL_ALIASES,
    DEFAULT_MODEL_NAME,
    FETCH_COMMAND,
    ModelFetchError,
    convert_default_model,
    default_model_path,
    fetch_default_model,
    is_default_model_name,
)
from tracelearn.models.loading import LoadedModel, load_model, plain_dequantized_model, select_device
from tracelearn.models.resolve import (
    REGISTRY_PREFIX,
    adapter_base,
    parse_registry_model,
    registry_model_source,
    registry_model_version,
    resolve_model,
)
from tracelearn.models.source import ADAPTER_CONFIG, ModelLoadError, ModelNotFoundError, ModelSource

__all__ = [
    "ADAPTER_CONFIG",
    "DEFAULT_MODEL_ALIASES",
    "DEFAULT_MODEL_NAME",
    "FETCH_COMMAND",
    "REGISTRY_PREFIX",
    "LoadedModel",
    "ModelFetchError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelSource",
    "adapter_base",
    "convert_default_model",
    "default_model_path",
    "fetch_default_model",
    "is_default_model_name",
    "load_model",
    "parse_registry_model",
    "plain_dequantized_model",
    "registry_model_source",
    "registry_model_version",
    "resolve_model",
    "select_device",
]
