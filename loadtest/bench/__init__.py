"""Benchmark of the three server models against textbook versions: `python -m loadtest.bench`."""
