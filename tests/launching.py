"""The one way the tests start a multi-process run: ``accelerate launch`` on a free port.

A fixed rendezvous port (accelerate's default, 29500) makes a launch fail when anything else on
the machine holds it: another job, or the store of a launch that is still shutting down.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

#: Node ids of the collected tests marked ``multiprocess`` (filled by conftest.py): a launch
#: from any other test is refused, so `-m multiprocess` and the stress script miss none.
MULTIPROCESS_TESTS: set[str] = set()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_launch(
    config: str | Path, *program: str, env: Mapping[str, str], timeout: float = 900
) -> subprocess.CompletedProcess:
    """Run ``accelerate launch --config_file CONFIG PROGRAM...`` (a script and its arguments,
    or ``-m module ...``); its output is captured as text."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    if test and test not in MULTIPROCESS_TESTS:
        raise AssertionError(f"{test} launches processes: mark it @pytest.mark.multiprocess")
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--main_process_port",
        str(free_port()),
        *program,
    ]
    return subprocess.run(command, env=dict(env), capture_output=True, text=True, timeout=timeout)
