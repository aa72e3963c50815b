"""Merge methods, one per file; each registers itself with :mod:`align.merging.registry`."""
