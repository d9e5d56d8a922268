"""The model tests use the suite's tiny random model (``tiny_model_dir``, ``tiny_model`` in tests/conftest.py)."""
