"""Benchmarks of the attenuation library: pytest-benchmark micro-benchmarks (test_bench_ops.py) and
the one-command suite (``python -m bench.suite --out DIR``) with its measured sections."""
