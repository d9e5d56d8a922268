"""The README's settings table is the one place users read settings: it must list every variable."""

from pathlib import Path

from tracelearn.collector.settings import ENV_VARS
from tracelearn.registry.backend import ENV_VARS as REGISTRY_ENV_VARS
from tracelearn.training.verl_backend import ENV_VARS as TRAINING_ENV_VARS

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_documents_every_setting_with_its_default() -> None:
    text = README.read_text(encoding="utf-8")
    for name, (default, meaning) in {**ENV_VARS, **REGISTRY_ENV_VARS, **TRAINING_ENV_VARS}.items():
        assert f"| `{name}` | `{default}` | {meaning} |" in text, f"README settings table lacks or misstates {name}"
