"""Benchmark of the server models against textbook versions: `python -m loadtest.bench`."""
