"""Run every multi-process test N times in a row and count passes, failures and aborts.

    python evaluation/stress_multiprocess.py                  # every `multiprocess` test, 10 runs
    python evaluation/stress_multiprocess.py -n 3 -m "multiprocess and not slow"
    python evaluation/stress_multiprocess.py -k zero2 --json /tmp/stress.json

A multi-process test launches two processes (DDP over gloo, DeepSpeed ZeRO on the CPU) that must
agree with one process; a flake there (a peer aborting at exit, a port taken, a hang) fails a
good change in CI. Each run is a fresh ``pytest`` process, so nothing is cached between runs.
Tests marked ``multiprocess("module")`` share one launch through a module fixture: their module
is one unit, run whole. An *abort* is a run whose output shows a process killed by a signal
(``terminate called``, SIGABRT, a core dump), whether or not the test noticed.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from rich.markup import escape
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
ABORT = re.compile(r"terminate called|SIGABRT|Signals\.SIGABRT|core dumped|exitcode\s*:\s*-6")


class _Collector:
    """A pytest plugin that records the collected ``multiprocess`` items and their unit."""

    def __init__(self) -> None:
        self.units: dict[str, None] = {}  # ordered set

    def pytest_collection_finish(self, session) -> None:
        for item in session.items:  # after -m / -k deselection
            marker = item.get_closest_marker("multiprocess")
            if marker is None:
                continue
            per_module = "module" in marker.args
            self.units[item.nodeid.split("::")[0] if per_module else item.nodeid] = None


def collect(marker: str, keyword: str | None) -> list[str]:
    collector = _Collector()
    arguments = [
        "--collect-only",
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        marker,
        str(REPO / "tests"),
    ]
    if keyword:
        arguments += ["-k", keyword]
    code = pytest.main(arguments, plugins=[collector])
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        sys.exit(f"error: collecting the tests failed (pytest exit {int(code)})")
    return list(collector.units)


def run_once(unit: str, marker: str, timeout: float) -> tuple[str, float, str]:
    """One fresh pytest run of ``unit``: ("pass" | "fail" | "abort" | "timeout", seconds, log)."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", marker]
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [*command, unit], cwd=REPO, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as expired:
        log = (expired.stdout or b"").decode(errors="replace") if expired.stdout else ""
        return "timeout", time.perf_counter() - started, log
    seconds = time.perf_counter() - started
    log = done.stdout + done.stderr
    if ABORT.search(log):
        return "abort", seconds, log
    return ("pass" if done.returncode == 0 else "fail"), seconds, log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--repeats", type=int, default=10, help="runs of each test")
    parser.add_argument("-m", "--marker", default="multiprocess", help="pytest -m expression")
    parser.add_argument("-k", "--keyword", help="pytest -k expression, to pick tests")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument("--json", type=Path, help="write the counts (and failing logs) here")
    options = parser.parse_args()
    if options.repeats < 1:
        parser.error("--repeats must be at least 1")
    units = collect(options.marker, options.keyword)
    if not units:
        sys.exit(f"error: no test matches -m {options.marker!r} -k {options.keyword!r}")
    console = Console(width=200)  # test ids in full
    print(f"{len(units)} units × {options.repeats} runs", flush=True)
    results: dict[str, dict] = {}
    for unit in units:
        outcomes, seconds, logs = [], [], []
        for attempt in range(options.repeats):
            outcome, elapsed, log = run_once(unit, options.marker, options.timeout)
            outcomes.append(outcome)
            seconds.append(elapsed)
            if outcome != "pass":
                logs.append(log[-4000:])
            print(f"  {unit} run {attempt + 1}: {outcome} ({elapsed:.0f} s)", flush=True)
            if outcome != "pass":  # why, at once: a long stress run may be stopped before its end
                print("    " + "\n    ".join(log.strip().splitlines()[-15:]), flush=True)
        results[unit] = {
            "pass": outcomes.count("pass"),
            "fail": outcomes.count("fail") + outcomes.count("timeout"),
            "abort": outcomes.count("abort"),
            "median_s": statistics.median(seconds),
            "failing_logs": logs,
        }
        if options.json:  # after every test, for the same reason
            options.json.write_text(json.dumps(results, indent=1))
    table = Table(title=f"multi-process tests, {options.repeats} runs each")
    for column in ("test", "passed", "failed", "aborted", "median s"):
        table.add_column(column, justify="left" if column == "test" else "right")
    for unit, counts in results.items():
        table.add_row(
            escape(unit.removeprefix("tests/")),  # "[zero2]" is a parameter, not markup
            str(counts["pass"]),
            str(counts["fail"]),
            str(counts["abort"]),
            f"{counts['median_s']:.0f}",
        )
    console.print(table)
    if options.json:
        options.json.write_text(json.dumps(results, indent=1))
    bad = sum(c["fail"] + c["abort"] for c in results.values())
    console.print(f"{bad} failed or aborted runs of {len(units) * options.repeats}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
