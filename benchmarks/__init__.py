"""Benchmarks: measurements, run as ``python -m benchmarks.NAME``; they never assert timings."""
