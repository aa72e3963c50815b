"""Work shared by the processes of one ``accelerate launch`` (or ``torchrun``) run.

A sweep or a batch of guided answers is a list of independent work items (batches of rows).
Every process takes a contiguous slice of them, the answers are gathered on rank 0, and rank 0
alone writes what is written (reports, caches, output files). The items are the same whatever
the number of processes — only who decodes them changes — so every row is decoded in exactly
the batch it would be decoded in by one process, and greedy answers are the same.

One process (``WORLD_SIZE`` unset or 1) needs no process group: every collective is then the
identity, and nothing of accelerate is imported.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class PeerError(RuntimeError):
    """Another process of the run failed; its error is reported by that process."""


@dataclass(frozen=True)
class Shard:
    """This process's place in the run: ``rank`` of ``world`` processes (``local_rank`` on its
    machine)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owners(self, costs: Sequence[float]) -> list[int]:
        """The rank that does each item: contiguous runs, balanced by ``costs`` (item j goes to
        the rank whose share of the total holds the middle of item j)."""
        if not sum(costs) > 0:
            costs = [1.0] * len(costs)
        total = float(sum(costs))
        owners, done = [], 0.0
        for cost in costs:
            middle = (done + cost / 2) / total
            owners.append(min(int(middle * self.world), self.world - 1))
            done += cost
        return owners

    def mine(self, costs: Sequence[float]) -> list[int]:
        """The indices of the items this process does (see :meth:`owners`)."""
        return [j for j, owner in enumerate(self.owners(costs)) if owner == self.rank]

    def log_share(self, what: str, mine: int, total: int, unit: str) -> None:
        """One line on stderr per process of a several-process run: its share of the work."""
        if self.world > 1:
            import sys

            print(
                f"[align {what}] process {self.rank} of {self.world}: {mine} of {total} {unit}",
                file=sys.stderr,
                flush=True,
            )

    def gather(self, value: Any) -> list[Any] | None:
        """Every process's ``value`` in rank order, on rank 0; ``None`` on the others."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        received = [None] * self.world if self.is_main else None
        dist.gather_object(value, received, dst=0)
        return received

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value``, on every process."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check(self, error: BaseException | None) -> None:
        """Raise ``error`` where it happened and :class:`PeerError` on every other process when
        any process has one (a collective: every process calls it at the same point)."""
        failed = error is not None
        if self.world > 1:
            import torch
            import torch.distributed as dist

            flag = torch.tensor([int(failed)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            failed = bool(flag.item())
        if error is not None:
            raise error
        if failed:
            raise PeerError("another process of this run failed (its error is shown there)")

    def device(self, device: str | None) -> str | None:
        """``device`` for this process: a bare accelerator type (``cuda``) becomes this
        process's own one (``cuda:<local rank>``) when several processes share the machine."""
        if self.world > 1 and device in ("cuda", "xpu", "npu", "mlu"):
            return f"{device}:{self.local_rank}"
        return device


@functools.cache
def current_shard() -> Shard:
    """The shard of this process, starting the process group (through accelerate's
    ``PartialState``) when the launcher started several."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Shard()
    import torch

    if not torch.cuda.is_available():
        # Several processes on a machine without GPUs: without this, accelerate gives every
        # process a world of its own and each would do the whole run alone.
        os.environ.setdefault("ACCELERATE_USE_CPU", "1")
    from accelerate import PartialState

    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    state = PartialState(cpu=cpu)
    atexit.register(leave_process_group)
    return Shard(state.process_index, state.num_processes, state.local_process_index)


def leave_process_group() -> None:
    """Destroy this process's default process group, if one is up (on success and on error).

    Left to interpreter exit, gloo's worker threads are destroyed after Python has torn down and
    a process whose work is done can still abort ("terminate called without an active
    exception", SIGABRT). Every entry point that starts a group calls this when it ends, and
    :func:`current_shard` registers it with ``atexit`` for library callers. No barrier: on an
    error path the peers may be gone, and a barrier would wait for them until gloo's timeout."""
    if "torch.distributed" not in sys.modules:
        return  # nothing could have started a group (and `align --help` stays torch-free)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
