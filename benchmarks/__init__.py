"""Benchmarks of nsfw-safety against the reference paths: ``python -m benchmarks --help``."""
