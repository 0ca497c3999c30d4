"""Helpers the tests share (not tests themselves). `tests/` is on sys.path (pyproject's
pytest pythonpath), so a test imports them as `from helpers.recipes import train_recipe`."""
