"""Build ``.gpu_bundle/``: the wheels the GPU suite needs on a GPU machine with no registry.

    python evaluation/benchmarks/gpu_bundle.py [--output .gpu_bundle]      (make gpu-bundle)

The project's GPU machine (the device tool's nvidia-h200) has Python 3.12, a CUDA 13 build of
PyTorch, accelerate, transformers 5.17 and some peft, and no trl, datasets, bitsandbytes,
deepspeed or moocore; nothing can be downloaded there. This fetches, for CPython 3.12 on
manylinux x86_64, with ``--no-deps`` (the folder is installed with ``pip install --no-index
--no-deps``, so every wheel the machine lacks is named here), the versions this environment
runs (what the tests pass with; unpinned where one is not installed here):

* transformers and peft: align calls transformers 5.2x's API (the ``cache=`` keyword of the
  models' forward, 5.17's ``past_key_values``) and PEFT's internals;
* trl, datasets (+ dill, multiprocess), moocore (+ cffi, pycparser, platformdirs), gguf and
  vaderSentiment: align's own dependencies that the machine lacks;
* bitsandbytes, slimmed: its wheel (43 MB) carries a native library for every CUDA, ROCm and
  XPU version; the bundle keeps the CPU library and those of ``--cuda-majors`` (default 13:
  the machine's torch is cu130), the rest of the wheel unchanged (its RECORD rewritten);
* deepspeed, an sdist: built here into a pure-Python wheel (``pip wheel --no-deps
  --no-build-isolation``, no ops prebuilt: they compile on first use), with its missing
  dependencies hjson, pydantic, pydantic-core, annotated-types and typing-inspection;
* setuptools, so that align's editable install builds offline there.

Prints each wheel's size and the total with the working tree that travels (tracked and
untracked-not-ignored files) against the device tool's 64 MiB; exits 1 when over it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 64 * 2**20  # the device tool's limit on what travels: working tree + carried paths

#: Every wheel the machine lacks (or has in another version); the version is the one installed here.
WHEELS = [
    "transformers",
    "peft",
    "trl",
    "datasets",
    "dill",
    "multiprocess",
    "moocore",
    "cffi",
    "pycparser",
    "platformdirs",
    "gguf",
    "vaderSentiment",
    "hjson",
    "pydantic",
    "pydantic_core",
    "annotated-types",
    "typing-inspection",
    "setuptools",
    "bitsandbytes",
]
SDISTS = ["deepspeed"]
MANYLINUX = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
    "any",
)


def platform_options(python_version: str) -> list[str]:
    """pip download's options for CPython ``python_version`` on manylinux x86_64 (the GPU
    machine's processor, whatever this one's)."""
    options = ["--python-version", python_version, "--implementation", "cp"]
    options += ["--only-binary=:all:"]
    for tag in MANYLINUX:
        options += ["--platform", tag]
    return options


def requirement(name: str) -> str:
    """``name==version`` as installed here (what the tests ran with), else ``name``."""
    try:
        return f"{name}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return name


def pip(*args: str, env: dict[str, str] | None = None) -> None:
    command = [sys.executable, "-m", "pip", *args]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env)


def slim_bitsandbytes(wheel: Path, cuda_majors: list[str]) -> tuple[int, int]:
    """Drop the native libraries of other accelerators from a bitsandbytes wheel, in place;
    returns its sizes before and after."""
    keep = re.compile(rf"libbitsandbytes_(cpu|cuda({'|'.join(cuda_majors)})\d+)\.so$")
    before = wheel.stat().st_size
    staged = wheel.with_suffix(".slim")
    with (
        zipfile.ZipFile(wheel) as source,
        zipfile.ZipFile(staged, "w", zipfile.ZIP_DEFLATED) as out,
    ):
        dropped = {
            info.filename
            for info in source.infolist()
            if re.search(r"libbitsandbytes_\w+\.so$", info.filename)
            and not keep.search(info.filename)
        }
        for info in source.infolist():
            if info.filename in dropped:
                continue
            data = source.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = (
                    "\n".join(r for r in lines if r.split(",")[0] not in dropped) + "\n"
                ).encode()
            out.writestr(info, data)
    staged.replace(wheel)
    return before, wheel.stat().st_size


def tree_size() -> int:
    """Bytes of the working tree that the device tool sends (tracked and untracked files that
    git does not ignore; a shared/ folder in the checkout too)."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    paths = {ROOT / os.fsdecode(n) for n in names if n}
    shared = ROOT / "shared"
    if shared.is_dir():
        paths |= {p for p in shared.rglob("*")}
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(ROOT / ".gpu_bundle"))
    parser.add_argument(
        "--cuda-majors", default="13", help="comma-separated CUDA major versions bitsandbytes keeps"
    )
    parser.add_argument(
        "--python-version", default="3.12", help="the GPU machine's Python (KINDS.md: 3.12)"
    )
    args = parser.parse_args(argv)
    output = Path(args.output)
    with tempfile.TemporaryDirectory(prefix="gpu-bundle-") as staging:
        staging = Path(staging)
        download = ["download", "--quiet", "--no-deps", *platform_options(args.python_version)]
        pip(*download, "--dest", str(staging), *map(requirement, WHEELS))
        build = ["wheel", "--quiet", "--no-deps", "--no-build-isolation"]
        env = {**os.environ, "DS_BUILD_OPS": "0"}  # no ops prebuilt: they compile on first use
        pip(*build, "--wheel-dir", str(staging), *map(requirement, SDISTS), env=env)
        slimmed = None
        for wheel in staging.glob("bitsandbytes-*.whl"):
            slimmed = slim_bitsandbytes(wheel, args.cuda_majors.split(","))
        if output.exists():
            shutil.rmtree(output)
        shutil.copytree(staging, output)
    wheels = sorted(output.glob("*.whl"), key=lambda p: -p.stat().st_size)
    total = sum(p.stat().st_size for p in wheels)
    tree = tree_size()
    print(f"\n{'wheel':<88}{'MB':>8}")
    for wheel in wheels:
        print(f"{wheel.name:<88}{wheel.stat().st_size / 1e6:>8.2f}")
    if slimmed:
        print(
            f"(bitsandbytes slimmed to CUDA {args.cuda_majors}.x + CPU: "
            f"{slimmed[0] / 1e6:.1f} MB -> {slimmed[1] / 1e6:.1f} MB)"
        )
    print(
        f"bundle {total / 2**20:.1f} MiB in {len(wheels)} wheels; with the working tree "
        f"({tree / 2**20:.1f} MiB) {(total + tree) / 2**20:.1f} MiB of the {LIMIT / 2**20:.0f} MiB "
        f"that may travel"
    )
    if total + tree > LIMIT:
        print("error: over the device tool's limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
