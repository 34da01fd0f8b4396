"""Benchmarks: `make bench` (``python -m bench.run``) runs them all and writes bench/RESULTS.md."""
