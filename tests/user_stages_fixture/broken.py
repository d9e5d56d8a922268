"""A module that fails on import, as user code with a missing dependency does."""

import not_an_installed_module_for_tracelearn_tests  # noqa: F401
