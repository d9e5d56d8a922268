"""What a model name resolves to: ``ModelSource`` (the files to load), and the errors of finding and loading."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


class ModelNotFoundError(FileNotFoundError):
    """A model name or path that points at nothing loadable on this machine."""


class ModelLoadError(RuntimeError):
    """Files that were found but could not be turned into a working model (bad weights, bad adapter)."""


@dataclass(frozen=True)
class ModelSource:
    """Files to load: a directory, and the GGUF file inside it when the weights are GGUF.

    ``base`` is set when ``directory`` holds a peft LoRA adapter: the adapter is loaded onto the
    model ``base`` names. ``version`` is the identity to report when the source already knows it (a
    registry version); otherwise the loader hashes the weights.
    """

    directory: Path
    gguf_file: str | None
    model_id: str
    version: str | None = None
    base: ModelSource | None = None

    @property
    def weight_files(self) -> list[Path]:
        """The files whose bytes define the model (hashed into its version); an adapter's include its base's."""
        if self.gguf_file is not None:
            return [self.directory / self.gguf_file]
        files = [p for p in self.directory.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)]
        config = self.directory / (ADAPTER_CONFIG if self.base is not None else "config.json")
        own = sorted([*files, config] if config.is_file() else files)
        return [*self.base.weight_files, *own] if self.base is not None else own
