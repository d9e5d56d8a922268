"""Loading what ``resolve_model`` found: a transformers model and tokenizer on a device, with its identity.

``load_model`` returns a ``LoadedModel`` whose ``model_version`` (a content hash of the weights, or
the registry version) records which weights answered a request or started a training run. A peft
LoRA adapter is loaded onto its base model and merged into it, so it decodes as fast as a plain model.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracelearn.models.source import ModelLoadError, ModelNotFoundError, ModelSource

if TYPE_CHECKING:
    import torch


@dataclass
class LoadedModel:
    """A model ready to generate with: weights on their device, tokenizer, identity and limits."""

    model: Any  # a transformers PreTrainedModel (its class depends on the architecture)
    tokenizer: Any  # a transformers PreTrainedTokenizerBase
    model_id: str
    model_version: str
    source: ModelSource
    device: torch.device
    context_length: int


def weights_digest(files: Iterable[Path]) -> str:
    """SHA-256 over the names and bytes of ``files``: the same weights give the same version anywhere."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def select_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cpu`` / ``cuda`` / ``cuda:N`` are taken as given."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but torch sees no CUDA device")
    return chosen


def plain_dequantized_model(model: Any) -> Any:
    """A GGUF-loaded model as the plain float32 model it is: transformers dequantizes GGUF at load but
    keeps it marked as quantized, and then refuses to save, cast or train it. Unmarked in place."""
    model.hf_quantizer = None
    vars(model).pop("is_quantized", None)  # set on the instance by the GGUF loader
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model


def load_model(source: ModelSource, device: str = "auto", max_model_len: int | None = None) -> LoadedModel:
    """Load weights and tokenizer, in float32 on CPU and bfloat16 on CUDA (GGUF weights are dequantized).

    A LoRA adapter (``source.base`` set) is loaded onto its base with peft and merged
    (``merge_and_unload``): the served model is a plain model again, with no adapter cost per token.
    ``max_model_len`` caps the context below the model's own limit (``max_position_embeddings``),
    like vLLM's ``--max-model-len``. Weights that cannot be loaded raise ``ModelLoadError``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = select_device(device)
    # Any: transformers' decorated ``to`` confuses mypy about the model's own type.
    model: Any
    tokenizer: Any
    if source.base is not None:
        base = load_model(source.base, device=device)
        tokenizer, model = base.tokenizer, _merge_adapter(base.model, source.directory)
    else:
        dtype = torch.bfloat16 if target.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        kwargs: dict[str, Any] = {"gguf_file": source.gguf_file} if source.gguf_file else {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.directory, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=dtype, **kwargs)
        except (OSError, ValueError, RuntimeError, KeyError, struct.error) as error:
            # safetensors and transformers raise any of these for truncated or mismatched weights.
            reason = f"{type(error).__name__}: {error}"
            raise ModelLoadError(f"cannot load the model in {source.directory}: {reason}") from error
        model = model.to(target).eval()
    if tokenizer.chat_template is None:
        raise ModelNotFoundError(f"{source.directory} has no chat template; the chat API cannot format prompts")
    text_config = model.config.get_text_config()
    model_limit = int(getattr(text_config, "max_position_embeddings", 0) or 2048)
    context_length = min(model_limit, max_model_len) if max_model_len else model_limit
    version = source.version or f"{source.model_id}@{weights_digest(source.weight_files)[:12]}"
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=source.model_id,
        model_version=version,
        source=source,
        device=target,
        context_length=context_length,
    )


def _merge_adapter(model: Any, adapter_directory: Path) -> Any:
    """``model`` with the peft LoRA adapter in ``adapter_directory`` merged into its weights."""
    from peft import PeftModel

    try:
        adapted = PeftModel.from_pretrained(model, adapter_directory)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise ModelLoadError(
            f"cannot load the LoRA adapter in {adapter_directory} onto its base model: {type(error).__name__}: {error}"
        ) from error
    return adapted.merge_and_unload().eval()
