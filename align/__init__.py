"""align: multi-objective alignment of language models along a preference vector α."""

from align.preference import Preference, sample_preferences, simplex_grid

__version__ = "0.1.0"

__all__ = ["Preference", "__version__", "sample_preferences", "simplex_grid"]
