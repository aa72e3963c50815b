"""Timing helpers shared by the benchmark scripts: a CUDA-synchronised wall clock.

CUDA kernels run asynchronously: without a synchronisation before reading the clock, a timer
measures how fast the host queued the work, not the work. On the CPU these are plain timers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def synchronize(device: Any = None) -> None:
    """Wait for every kernel queued on ``device`` (a no-op for the CPU or None)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(work: Callable[[], Any], device: Any = None) -> tuple[float, Any]:
    """``(seconds, result)`` of ``work()``, synchronised before and after on ``device``."""
    synchronize(device)
    start = time.perf_counter()
    result = work()
    synchronize(device)
    return time.perf_counter() - start, result
