"""align: multi-objective alignment of language models along a preference vector α."""

from align.preference import Preference, sample_preferences, simplex_grid

# Registers SVD-LoRA and PBLoRA with PEFT, so PeftModel.from_pretrained finds them after `import align`.
from align import adapters  # noqa: E402,F401  isort: skip

__version__ = "0.1.0"

__all__ = ["Preference", "__version__", "sample_preferences", "simplex_grid"]
