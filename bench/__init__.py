"""Ferry benchmarks: ``python -m bench``."""
