"""Launched on two processes by tests/test_sweep_shards.py: ``align.evaluate`` (what
``accelerate launch -m align.evaluate`` runs) and then ``align generate`` (what ``accelerate
launch -m align generate`` runs), in the processes of one launch so that both share one start-up.

    shard_commands.py EVALUATE-ARGUMENTS... -- GENERATE-ARGUMENTS...
"""

import sys

if __name__ == "__main__":
    from align.cli import app
    from align.distributed import leave_process_group
    from align.evaluate import main

    split = sys.argv.index("--")
    try:
        main(sys.argv[1:split])
        app(["generate", *sys.argv[split + 1 :]], prog_name="align", standalone_mode=False)
    finally:
        leave_process_group()
