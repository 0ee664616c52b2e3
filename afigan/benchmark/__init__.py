"""Benchmarks behind tools/benchmark_*.py (speed and memory live here, never in tests)."""
