"""Registering align's tuners with PEFT (done once, when align.adapters is imported).

PEFT's ``register_peft_method`` accepts only names in its closed ``PeftType`` enum, but its
mapping dicts are plain dicts keyed by the str-valued enum, so a plain string key works for
``get_peft_model``, ``save_pretrained`` and ``PeftModel.from_pretrained``.

``PeftModel`` strips its "special" forward arguments (``adapter_names`` ...) before calling the
transformers model; that set is filled per instance in ``__init__``, before the tuner exists,
so ``pref`` is added right after construction when the tuner is one of ours.
"""

from __future__ import annotations

import functools

from peft import PeftModel
from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)

from align.adapters.base import ADAPTERS, PREF_KWARG, PreferenceTuner


def register() -> None:
    import align.adapters.pblora  # noqa: F401 — each tuner registers itself in ADAPTERS
    import align.adapters.svdlora  # noqa: F401

    for tuner_cls in ADAPTERS.entries().values():
        peft_type = tuner_cls.adapter_type
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = tuner_cls.config_class
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = tuner_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = tuner_cls.prefix
    if not getattr(PeftModel.__init__, "_align_pref_arg", False):
        original = PeftModel.__init__

        @functools.wraps(original)
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            if isinstance(self.base_model, PreferenceTuner):
                self.special_peft_forward_args.add(PREF_KWARG)

        __init__._align_pref_arg = True
        PeftModel.__init__ = __init__
