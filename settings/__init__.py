"""Settings: every ``TRACELEARN_*`` environment variable, declared once and read through its declaration.

``variables`` declares each (name, type, default, meaning, the part that reads it) and lists them in
``SETTINGS``; ``setting`` holds ``Setting`` (``value()``, ``optional()``, ``text()``) and
``SettingError``; ``docs`` generates the table of docs/settings.md from ``SETTINGS``.

At the bottom of the dependency graph beside ``schemas`` and ``storage``: every part may read a setting.
May import: the standard library only. Must never import any other tracelearn package.
"""

from tracelearn.settings.setting import Setting, SettingError
from tracelearn.settings.variables import SETTINGS

__all__ = ["SETTINGS", "Setting", "SettingError"]
