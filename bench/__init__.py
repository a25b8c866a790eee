"""Benchmarks for batchjob: run with `python -m bench` (see bench/README or the main README)."""
