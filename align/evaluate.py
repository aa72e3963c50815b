"""Run an α sweep from an evaluation config: ``python -m align.evaluate CONFIG.yaml``.

Across processes — ``accelerate launch -m align.evaluate CONFIG.yaml [--set key=value ...]`` —
the (α, prompt) batches are shared by the processes and rank 0 writes the report (and the
generation caches): the same report as one process writes (see
:func:`align.sweep.run.run_sweep`). ``align evaluate`` is the same command for one process.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from align.errors import debug_requested, describe, user_error_types


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    from align.distributed import PeerError, current_shard

    parser = argparse.ArgumentParser(prog="align.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="an evaluation config YAML (recipes/evaluate/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    parser.add_argument(
        "--debug", action="store_true", help="Show the full traceback of an error (ALIGN_DEBUG=1)."
    )
    options = parser.parse_args(argv)
    from align.sweep import load_sweep_config, run_sweep

    try:
        config = load_sweep_config(options.config, options.overrides)
        run_sweep(config, show_progress=not options.quiet)
    except PeerError:
        sys.exit(1)  # another process failed and shows why
    except user_error_types() as error:
        if debug_requested(options.debug):
            raise
        sys.exit(f"error: {describe(error)}")
    if current_shard().is_main:
        print((Path(config.output) / "summary.md").read_text())
        print(f"report: {config.output}")


if __name__ == "__main__":
    from align.distributed import leave_process_group

    try:
        main()
    finally:
        leave_process_group()
