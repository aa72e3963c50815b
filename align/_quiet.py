"""Start-up messages of third-party libraries that a user of align cannot act on, silenced.

Each is dropped by a logging filter on the one logger that emits it (or a warnings filter on
the one module that warns), matched by the start of its message, so everything else those
libraries log (their real warnings included) still shows.
Installed when ``align`` is imported, before the libraries are: a logger's filters survive the
library configuring it later. ``ALIGN_DEBUG=1`` keeps them all.
"""

from __future__ import annotations

import logging
import re
import warnings

# logger name -> message starts that carry no advice for an align user.
QUIET_MESSAGES: dict[str, tuple[str, ...]] = {
    # bitsandbytes on a CPU with AVX512-BF16 looks for an optional faster kernel from the hub
    # (the `kernels` package, not installed) and warns on every import; the slower path works.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    # DeepSpeed announces the accelerator it picked whenever it is imported (by accelerate,
    # peft or trl), also in runs that do not use DeepSpeed.
    "DeepSpeed": ("Setting ds_accelerator to", "Setting accelerator to CPU"),
}

# (message start, category, module that warns): deprecations that fire inside another library's
# own call, which neither align nor its user can change. PEFT 0.21 reads transformers' old
# `is_gradient_checkpointing` name whenever it wraps a model.
QUIET_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (
        "`is_gradient_checkpointing` is deprecated",
        FutureWarning,
        r"transformers\.modeling_utils",
    ),
)


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def install() -> None:
    """Add the filters (once per logger)."""
    from align.errors import debug_requested

    if debug_requested():
        return
    for message, category, module in QUIET_WARNINGS:
        warnings.filterwarnings(
            "ignore", message=re.escape(message), category=category, module=module
        )
    for name, starts in QUIET_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(starts))
