"""Benchmarks: ``loyalty bench`` (``bench.run``) and micro-benchmarks of single steps."""
