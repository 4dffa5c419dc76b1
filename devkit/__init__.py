"""Offline fixtures for tests, bench and demo: real Whisper weights, real speech, tiny random models.

A development package at the repository root (not in the wheel); ``python -m devkit`` builds them all.

Everything is built lazily into a cache directory (see :func:`cache.cache_dir`) from
public PyPI wheels, so no model hub is needed and nothing large is committed.
"""
