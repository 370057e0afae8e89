"""Sagas built on the framework alone, each runnable with `python -m examples.<name>`."""
