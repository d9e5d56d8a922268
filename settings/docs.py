"""The settings table of ``docs/settings.md``, generated from ``SETTINGS``.

    python -m tracelearn.settings.docs                  # print the table
    python -m tracelearn.settings.docs docs/settings.md # replace the table under the file's "# Settings" title

A test compares the page's table with ``settings_table()``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tracelearn.settings.variables import SETTINGS

SECTION = "# Settings"
HEADER = "| variable | type | default | meaning | read by |"


def settings_table() -> str:
    """The settings table in Markdown, one row per variable, in ``SETTINGS`` order."""
    rows = [HEADER, "|---|---|---|---|---|"]
    for setting in SETTINGS:
        default = "unset" if setting.default is None else setting.default
        rows.append(f"| `{setting.name}` | {setting.kind.name} | `{default}` | {setting.meaning} | {setting.read_by} |")
    return "\n".join(rows) + "\n"


def table_in(text: str) -> tuple[int, int]:
    """Where the first table under the ``# Settings`` title starts and ends in ``text`` (character offsets)."""
    section = text.index(f"{SECTION}\n")
    start = text.index("\n|", section) + 1
    end = start
    while end < len(text) and text.startswith("|", end):
        end = text.index("\n", end) + 1
    return start, end


def replace_table(text: str) -> str:
    start, end = table_in(text)
    return text[:start] + settings_table() + text[end:]


def main(arguments: list[str]) -> int:
    if not arguments:
        sys.stdout.write(settings_table())
        return 0
    path = Path(arguments[0])
    path.write_text(replace_table(path.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
