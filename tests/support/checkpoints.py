"""Small checkpoint directories on disk for registry tests: valid Hugging Face and LoRA layouts, no training."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_hf_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A directory with config.json, a tokenizer file and real safetensors weights (content depends on ``seed``)."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    save_file({"embed.weight": torch.randn(16, 8, generator=generator)}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 8}))
    (directory / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    return directory


def write_lora_adapter(directory: Path, base_model: str | None, seed: int = 0) -> Path:
    """A peft-shaped adapter directory; ``base_model=None`` leaves the base unnamed (invalid)."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    save_file({"lora_A.weight": torch.randn(4, 8, generator=generator)}, str(directory / "adapter_model.safetensors"))
    config: dict[str, object] = {"peft_type": "LORA", "r": 4, "lora_alpha": 8}
    if base_model is not None:
        config["base_model_name_or_path"] = base_model
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory
