"""Benchmarks (scripts, not tests): ``python benchmarks/run.py``. CI runs only their smoke test."""
