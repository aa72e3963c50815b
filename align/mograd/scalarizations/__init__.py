"""Loss-level methods, one per file: each maps the loss vector (and α) to one scalar."""
