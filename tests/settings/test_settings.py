"""Every ``TRACELEARN_*`` variable is declared once, and read and checked through its declaration."""

import re
import subprocess
from pathlib import Path

import pytest

from tracelearn.settings import SETTINGS, SettingError
from tracelearn.settings.variables import BY_NAME, COMPRESSION, MODEL_CACHE, PROMPTS, REGISTRY, ROLL_BYTES, ROLL_SECONDS

ROOT = Path(__file__).resolve().parents[2]
NAME = re.compile(r"TRACELEARN_[A-Z0-9_]*[A-Z0-9]")


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in listed.decode().split("\0") if name]


def test_every_variable_named_anywhere_in_the_tree_is_declared() -> None:
    named: dict[str, set[str]] = {}
    for path in tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue
        for name in NAME.findall(text):
            named.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    undeclared = {name: sorted(paths)[:3] for name, paths in named.items() if name not in BY_NAME}
    assert not undeclared, f"declare these in settings/variables.py: {undeclared}"
    assert len(BY_NAME) == len(SETTINGS), "a variable is declared twice"


def test_values_are_read_checked_and_defaulted(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ROLL_BYTES.value({}) == 67108864 and ROLL_SECONDS.value({"TRACELEARN_ROLL_SECONDS": "0.5"}) == 0.5
    assert ROLL_SECONDS.value({"TRACELEARN_ROLL_SECONDS": ""}) == 60, "empty counts as unset"
    assert COMPRESSION.value({"TRACELEARN_COMPRESSION": "ZSTD"}) == "zstd"
    with pytest.raises(SettingError, match=r"TRACELEARN_ROLL_SECONDS='soon' is not a number"):
        ROLL_SECONDS.value({"TRACELEARN_ROLL_SECONDS": "soon"})
    with pytest.raises(SettingError, match=r"TRACELEARN_ROLL_BYTES='-1' must be positive"):
        ROLL_BYTES.value({"TRACELEARN_ROLL_BYTES": "-1"})
    with pytest.raises(SettingError, match=r"TRACELEARN_COMPRESSION='lzma' is not one of zstd, snappy"):
        COMPRESSION.value({"TRACELEARN_COMPRESSION": "lzma"})
    assert PROMPTS.optional({}) is None
    with pytest.raises(SettingError, match="TRACELEARN_PROMPTS is not set"):
        PROMPTS.value({})
    monkeypatch.setenv("TRACELEARN_MODEL_CACHE", "~/models")
    assert MODEL_CACHE.value() == Path("~/models").expanduser()
    assert REGISTRY.value({"TRACELEARN_REGISTRY": "s3://bucket/registry"}) == "s3://bucket/registry"
    assert REGISTRY.value({}) == str(Path("~/.cache/tracelearn/registry").expanduser())
