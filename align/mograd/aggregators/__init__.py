"""Gradient-level methods, one per file: each maps the m×m Gram matrix to m weights."""
