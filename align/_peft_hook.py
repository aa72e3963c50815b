"""Register align's PEFT tuners as soon as PEFT is imported, without importing it ourselves.

Importing PEFT costs seconds (it pulls in transformers and bitsandbytes), which every `align`
command would pay, even `align --help`. Instead, `import align` installs this hook: if PEFT is
already loaded the tuners are registered at once, otherwise right after PEFT finishes loading,
so ``import align; PeftModel.from_pretrained(base, "pblora-adapter/")`` still works.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys


class _RegisterAfterPeft(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "peft":
            return None
        sys.meta_path.remove(self)  # find the real spec, once
        spec = importlib.util.find_spec("peft")
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            import align.adapters  # noqa: F401  registers SVD-LoRA and PBLoRA

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if "peft" in sys.modules:
        import align.adapters  # noqa: F401
    elif not any(isinstance(finder, _RegisterAfterPeft) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterPeft())
