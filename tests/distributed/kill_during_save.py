"""``align.train`` with a crash injected in the middle of writing one checkpoint.

    accelerate launch ... tests/distributed/kill_during_save.py CHECKPOINT RECIPE [--set ...]

On the last rank, the first file that ``torch.save`` writes into the staging folder of
``CHECKPOINT`` (e.g. ``checkpoint-4``; under DeepSpeed, a ZeRO optimizer shard) is written half
and the process then kills itself with SIGKILL: no handler, no ``finally``, as a lost machine or
the OOM killer would end it. The launcher then stops the other ranks. Everything else is the
real training run.
"""

import io
import os
import signal
import sys

import torch

if __name__ == "__main__":
    checkpoint, arguments = sys.argv[1], sys.argv[2:]
    staging = f".{checkpoint}.partial"
    save = torch.save
    last_rank = int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1

    def save_then_die(obj, f, *args, **kwargs):
        if last_rank and isinstance(f, (str, os.PathLike)) and staging in str(f):
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            with open(f, "wb") as half:
                half.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return save(obj, f, *args, **kwargs)

    torch.save = save_then_die
    from align.train import main

    main(arguments)
