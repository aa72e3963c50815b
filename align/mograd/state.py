"""State sized by the number of objectives, which a method only learns at its first call.

``get_aggregator("dwa")`` cannot know m, so buffers such as DWA's loss history start empty and
take their size on first use. A freshly built method must still accept a ``state_dict`` saved
after training started; :class:`ObjectiveState` lets an empty buffer adopt the saved shape, so
resuming is ``get_aggregator(name)`` followed by ``load_state_dict``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ObjectiveState(nn.Module):
    """Mixin for modules whose empty (``numel() == 0``) buffers are sized lazily."""

    def _size_buffer(
        self, name: str, shape: tuple[int, ...], fill: float = 0.0, device=None
    ) -> Tensor:
        """The named buffer, given ``shape`` (on ``device``, default its own) on first use; a
        different shape later is an error (the method was built for another number of
        objectives)."""
        buffer: Tensor = getattr(self, name)
        if buffer.numel() == 0:
            device = buffer.device if device is None else device
            buffer = torch.full(shape, fill, dtype=buffer.dtype, device=device)
            setattr(self, name, buffer)
        elif tuple(buffer.shape) != tuple(shape):
            raise ValueError(
                f"{type(self).__name__} holds state for shape {tuple(buffer.shape)} ({name}) and "
                f"now gets {tuple(shape)}: build a new instance for a different number of "
                f"objectives"
            )
        return buffer

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # An empty buffer has not been sized yet: take the saved shape instead of failing with
        # a size mismatch, so that a new instance can resume a run.
        for name, buffer in self._buffers.items():
            saved = state_dict.get(prefix + name)
            if buffer is not None and buffer.numel() == 0 and saved is not None:
                self._buffers[name] = buffer.new_empty(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
