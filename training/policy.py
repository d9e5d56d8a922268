"""The policy being trained: loading (full or LoRA), precision, per-token logprobs, checkpoints.

Models are named the way ``tracelearn serve`` names them (``smollm2``, a Hugging Face directory, a
``.gguf`` file, a LoRA adapter directory, ``registry:NAME@ALIAS``) and resolved by
``tracelearn.models``, so a checkpoint trained here is served by the same rules.
Master weights are float32; ``precision`` bf16 runs the forward and backward passes under autocast.

LoRA: a fresh adapter (peft) on the loaded model, or, when the model named is itself a LoRA
adapter, that adapter trained further on its own base (so every version of a LoRA line shares one
base and stays small). The saved adapter names its base by a pinned reference (``registry:NAME@N``,
never an alias that may move), which is what the server loads it onto.

Logprobs are computed from the decoder's hidden states at response positions only: the language
model head (a ``hidden x vocabulary`` matmul and a float32 ``logsumexp``) never runs on prompt tokens.
"""

from __future__ import annotations

import contextlib
import json
import platform
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from tracelearn.models import (
    ADAPTER_CONFIG,
    REGISTRY_PREFIX,
    ModelSource,
    adapter_base,
    load_model,
    plain_dequantized_model,
    resolve_model,
    select_device,
)
from tracelearn.models.loading import weights_digest
from tracelearn.registry import Registry
from tracelearn.training.config import LoraConfig, RuntimeConfig
from tracelearn.training.losses import token_logprobs
from tracelearn.training.sequences import TokenSequence

__all__ = [
    "MIN_SHARED_PREFIX",
    "MicroBatch",
    "Policy",
    "autocast_dtype",
    "cpu_has_native_bf16",
    "load_policy",
    "pinned_reference",
    "save_checkpoint",
    "shared_prefix_length",
]

# A shared prefix shorter than this is not worth a second forward pass.
MIN_SHARED_PREFIX = 16


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX512-BF16); elsewhere bf16 is emulated (slow)."""
    if platform.system() != "Linux":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: plain float32)."""
    if precision == "fp32":
        return None
    supported = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if supported else None


def pinned_reference(reference: str, source: ModelSource) -> str:
    """``reference`` with a registry alias replaced by the version it named (``registry:calc-policy@3``)."""
    if reference.startswith(REGISTRY_PREFIX):
        return REGISTRY_PREFIX + source.model_id
    path = Path(reference).expanduser()
    return str(path.resolve()) if path.exists() else reference


@dataclass
class Policy:
    """A model ready to train: weights (float32 master copy), tokenizer, where it runs and how.

    ``base_reference`` is what a saved checkpoint names as its origin: the pinned model reference for
    full fine-tuning, the adapter's base for LoRA. ``started_from`` is the pinned reference of the
    weights training started from (the parent in the lineage).
    """

    model: Any
    tokenizer: Any
    device: torch.device
    autocast: torch.dtype | None
    lora: bool
    base_reference: str
    started_from: str
    model_version: str
    share_prefix: bool = True

    @property
    def min_shared_prefix(self) -> int | None:
        """The shortest prefix worth sharing in a forward pass; None: never share (gradient checkpointing
        recomputes layers from their inputs, which a broadcast cache is not)."""
        return MIN_SHARED_PREFIX if self.share_prefix else None

    def prefix_to_share(self, sequences: Sequence[TokenSequence]) -> int:
        """The prefix all of ``sequences`` share, as the micro-batch packing should count it (0: none)."""
        if not self.share_prefix or len(sequences) < 2:
            return 0
        shared = shared_prefix_length(sequences)
        return shared if shared >= MIN_SHARED_PREFIX else 0

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def autocast_context(self) -> Iterator[None]:
        if self.autocast is None:
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=self.autocast):
            yield

    def logprobs(self, batch: MicroBatch) -> torch.Tensor:
        """Per response token logprobs ``[rows, longest response]`` under the current weights (0 on padding).

        With a shared prefix, the prefix runs once (batch of one) and its key/value cache is broadcast
        to every row for the suffixes: the same attention, and the same gradients (they sum through
        the broadcast), as running every row in full, for a fraction of the compute.
        """
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        decoder = base.get_decoder()
        with self.autocast_context():
            if batch.prefix_ids is None:
                decoded = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            else:
                prefix = decoder(input_ids=batch.prefix_ids, use_cache=True).cache
                rows = batch.input_ids.shape[0]
                cache = DynamicCache(ddp_cache_data=[(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1))
                                                     for keys, values, *_ in prefix])
                decoded = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  position_ids=batch.position_ids, cache=cache, use_cache=True)
            hidden = decoded.last_hidden_state
            index = batch.logit_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
            logits = base.get_output_embeddings()(hidden.gather(1, index))
        return token_logprobs(logits, batch.targets, batch.temperatures) * batch.mask_any


def shared_prefix_length(sequences: Sequence[TokenSequence]) -> int:
    """Tokens every sequence's prompt starts with, leaving each at least one prompt token of its own
    (the position whose logits predict its first response token)."""
    first = sequences[0].prompt_ids
    limit = min(len(s.prompt_ids) for s in sequences) - 1
    length = 0
    while length < limit and all(s.prompt_ids[length] == first[length] for s in sequences):
        length += 1
    return length


@dataclass
class MicroBatch:
    """Padded tensors of one forward pass (right padding; ``[rows, ...]``).

    Without a shared prefix, ``input_ids`` holds whole sequences. With one (``prefix_ids``, ``[1, P]``),
    ``input_ids`` holds what follows it, ``attention_mask`` covers prefix and suffix (``[rows, P + S]``)
    and ``position_ids`` continue from ``P``. ``logit_positions[i, j]`` is the position in
    ``input_ids`` whose logits predict response token j of row i (``prompt_len - 1 - P + j``);
    ``mask`` is the loss mask (0 on padding), ``mask_any`` 1 on every real response token (logprobs
    are kept there even where the loss mask is 0). ``temperatures`` divide each row's logits (the
    temperature it was sampled at); ``importance_weights`` are off-policy rows' truncated importance
    weights (1 on other rows).
    """

    sequences: list[TokenSequence]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    logit_positions: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    mask_any: torch.Tensor
    advantages: torch.Tensor
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    prefix_ids: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    temperatures: torch.Tensor | None = None  # [rows], None when every row was sampled at 1
    importance_weights: torch.Tensor | None = None  # [rows, longest response], None when no row has them

    @classmethod
    def of(cls, sequences: Sequence[TokenSequence], pad_id: int, device: torch.device,
           min_shared_prefix: int | None = MIN_SHARED_PREFIX) -> MicroBatch:
        """Tensors of ``sequences``; a prefix of at least ``min_shared_prefix`` tokens that every row
        shares is run once (None: never)."""
        rows = len(sequences)
        shared = shared_prefix_length(sequences) if rows > 1 and min_shared_prefix is not None else 0
        if min_shared_prefix is None or shared < min_shared_prefix:
            shared = 0
        longest = max(s.length for s in sequences) - shared
        longest_response = max(len(s.response_ids) for s in sequences)
        input_ids = torch.full((rows, longest), pad_id, dtype=torch.long)
        attention = torch.zeros((rows, shared + longest), dtype=torch.long)
        positions = torch.zeros((rows, longest_response), dtype=torch.long)
        targets = torch.zeros((rows, longest_response), dtype=torch.long)
        mask = torch.zeros((rows, longest_response))
        mask_any = torch.zeros((rows, longest_response))
        old = torch.zeros((rows, longest_response)) if all(s.old_logprobs is not None for s in sequences) else None
        ref = torch.zeros((rows, longest_response)) if all(s.ref_logprobs is not None for s in sequences) else None
        for row, sequence in enumerate(sequences):
            prompt, response = len(sequence.prompt_ids), len(sequence.response_ids)
            own = sequence.prompt_ids[shared:] + sequence.response_ids
            input_ids[row, : len(own)] = torch.tensor(own)
            attention[row, : shared + len(own)] = 1
            positions[row, :response] = torch.arange(prompt - 1 - shared, prompt - 1 - shared + response)
            targets[row, :response] = torch.tensor(sequence.response_ids)
            mask[row, :response] = torch.tensor(sequence.loss_mask, dtype=torch.float32)
            mask_any[row, :response] = 1.0
            if old is not None and sequence.old_logprobs is not None:
                old[row, :response] = torch.tensor(sequence.old_logprobs)
            if ref is not None and sequence.ref_logprobs is not None:
                ref[row, :response] = torch.tensor(sequence.ref_logprobs)
        temperature_values = [s.sampling_temperature for s in sequences]
        temperatures = (None if all(t == 1.0 for t in temperature_values)
                        else torch.tensor(temperature_values, dtype=torch.float32))
        weights = None
        if any(s.importance_weights is not None for s in sequences):
            weights = torch.ones((rows, longest_response))
            for row, sequence in enumerate(sequences):
                if sequence.importance_weights is not None:
                    weights[row, : len(sequence.importance_weights)] = torch.tensor(sequence.importance_weights)
        advantages = torch.tensor([s.advantage for s in sequences], dtype=torch.float32)
        prefix = torch.tensor([sequences[0].prompt_ids[:shared]]) if shared else None
        position_ids = (shared + torch.arange(longest)).expand(rows, -1) if shared else None

        def on_device(tensor: torch.Tensor | None) -> Any:
            return None if tensor is None else tensor.to(device)

        return cls(list(sequences), on_device(input_ids), on_device(attention), on_device(positions),
                   on_device(targets), on_device(mask), on_device(mask_any), on_device(advantages),
                   on_device(old), on_device(ref), on_device(prefix), on_device(position_ids),
                   on_device(temperatures), on_device(weights))

    @property
    def computed_tokens(self) -> int:
        """Token positions the forward pass computes (the shared prefix once, then every padded suffix)."""
        prefix = 0 if self.prefix_ids is None else int(self.prefix_ids.shape[1])
        return prefix + int(self.input_ids.numel())


def _peft_config(lora: LoraConfig) -> Any:
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=list(lora.target_modules), task_type="CAUSAL_LM")


def _float32_master_weights(model: Any) -> Any:
    """``model`` as a plain float32 model (the server loads bf16 on CUDA), cast in place.

    Not ``model.float()``: transformers refuses it for a GGUF-loaded model, which it still marks as
    quantized although its weights are dequantized (the marks are dropped first).
    """
    plain_dequantized_model(model)
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            tensor.data = tensor.data.float()
    return model


def load_policy(
    reference: str, lora: LoraConfig | None, runtime: RuntimeConfig, *, registry: Registry | None = None
) -> Policy:
    """Load ``reference`` for training (see the module docstring for the LoRA rules); ``registry`` resolves
    ``registry:`` references (``None``: the default registry).

    Raises ``ModelNotFoundError`` / ``ModelLoadError`` from the model store for names and weights that
    do not resolve or load, and ``ValueError`` for LoRA target modules the model does not have.
    """
    torch.manual_seed(runtime.seed)
    device = select_device(runtime.device)
    source = resolve_model(reference, registry=registry)
    started_from = pinned_reference(reference, source)
    if source.base is not None and lora is not None:
        from peft import PeftModel

        base = load_model(source.base, device=str(device))
        model = PeftModel.from_pretrained(_float32_master_weights(base.model), source.directory, is_trainable=True)
        # The version the server reports for this adapter (load_model's rule): comparable with the data's.
        version = source.version or f"{source.model_id}@{weights_digest(source.weight_files)[:12]}"
        tokenizer = base.tokenizer
        base_reference = adapter_base(source.directory)
    else:
        loaded = load_model(source, device=str(device))
        model, tokenizer, version = _float32_master_weights(loaded.model), loaded.tokenizer, loaded.model_version
        base_reference = started_from
        if lora is not None:
            from peft import get_peft_model

            model = get_peft_model(model, _peft_config(lora))
    if runtime.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Policy(model=model, tokenizer=tokenizer, device=device, autocast=autocast_dtype(runtime.precision, device),
                  lora=lora is not None, base_reference=base_reference, started_from=started_from,
                  model_version=version, share_prefix=runtime.share_prefix and not runtime.gradient_checkpointing)


def save_checkpoint(policy: Policy, directory: Path) -> Path:
    """Write the trained weights (an adapter for LoRA, a full model otherwise) and the tokenizer.

    A LoRA adapter's ``adapter_config.json`` names ``policy.base_reference`` as its base, so the
    server and the registry resolve the same base the training used. Full weights are written as
    float32 safetensors with the model's config.
    """
    directory.mkdir(parents=True, exist_ok=True)
    policy.model.save_pretrained(directory, safe_serialization=True)
    policy.tokenizer.save_pretrained(directory)
    if policy.lora:
        config_path = directory / ADAPTER_CONFIG
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = policy.base_reference
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    return directory
