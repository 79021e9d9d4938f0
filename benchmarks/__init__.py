"""Benchmarks of the three stages against plain baselines: `python -m benchmarks.run [--quick]`."""
