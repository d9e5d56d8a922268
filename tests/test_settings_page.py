"""docs/settings.md's table is the one place users read settings: it is generated from the declarations."""

from pathlib import Path

from tracelearn.settings.docs import settings_table, table_in

PAGE = Path(__file__).resolve().parent.parent / "docs" / "settings.md"


def test_the_settings_page_table_is_the_generated_one() -> None:
    text = PAGE.read_text(encoding="utf-8")
    start, end = table_in(text)
    assert text[start:end] == settings_table(), (
        "docs/settings.md's table differs from the declarations in settings/variables.py; "
        "regenerate it with: python -m tracelearn.settings.docs docs/settings.md"
    )
