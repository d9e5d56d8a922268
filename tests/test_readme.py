"""The README's settings table is the one place users read settings: it is generated from the declarations."""

from pathlib import Path

from tracelearn.settings.docs import settings_table, table_in

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_settings_table_is_the_generated_one() -> None:
    text = README.read_text(encoding="utf-8")
    start, end = table_in(text)
    assert text[start:end] == settings_table(), (
        "README.md's settings table differs from the declarations in settings/variables.py; "
        "regenerate it with: python -m tracelearn.settings.docs README.md"
    )
