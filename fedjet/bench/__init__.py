"""Benchmarks: speed targets are measured here, as ratios within one run, not in tests."""
