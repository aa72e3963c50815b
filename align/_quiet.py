"""Start-up messages of third-party libraries that a user of align cannot act on, silenced.

Each is dropped by a logging filter on the one logger that emits it, matched by the start of
its message, so everything else those libraries log (their real warnings included) still shows.
Installed when ``align`` is imported, before the libraries are: a logger's filters survive the
library configuring it later. ``ALIGN_DEBUG=1`` keeps them all.
"""

from __future__ import annotations

import logging

# logger name -> message starts that carry no advice for an align user.
QUIET_MESSAGES: dict[str, tuple[str, ...]] = {
    # bitsandbytes on a CPU with AVX512-BF16 looks for an optional faster kernel from the hub
    # (the `kernels` package, not installed) and warns on every import; the slower path works.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    # DeepSpeed announces the accelerator it picked whenever it is imported (by accelerate,
    # peft or trl), also in runs that do not use DeepSpeed.
    "DeepSpeed": ("Setting ds_accelerator to",),
}


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
    for name, starts in QUIET_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(starts))
