"""What the wheel ships: the recipes and the demo's dataset as package data, no research code
(lab/), and an installed align that finds them outside a checkout; the names ``align`` lists."""

import ast
import importlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import align

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "align"

#: Run in the installed copy, from a folder outside the checkout.
INSTALLED_CHECK = """
import json, sys
from pathlib import Path
import align
from align.demo.pipeline import DemoConfig, demo_dataset, shipped_recipes
from align.sweep.run import load_sweep_config
from align.train import load_recipe

config = DemoConfig(output="out")
recipes = config.recipes_dir()
data = demo_dataset(config, Path("out"))
load_recipe(recipes / "parm_cpu.yaml", [f"data.path={data}", "args.output_dir=out/parm"])
load_recipe(recipes / "genarm_cpu.yaml", [f"data.path={data}", "args.output_dir=out/arm"])
load_sweep_config(recipes / "evaluate" / "positive_brief.yaml")
print(json.dumps({
    "align": align.__file__, "recipes": str(recipes), "data": str(data),
    "lab": any(m == "lab" or m.startswith("lab.") for m in sys.modules),
}))
"""


def _shipped_files() -> set[str]:
    """Every file of align/recipes/ the wheel must carry (wheel paths)."""
    return {
        path.relative_to(REPO).as_posix()
        for path in (PACKAGE / "recipes").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def test_the_checkout_recipes_folder_is_the_packages():
    """``recipes/`` at the repository root (what users pass to ``align train``) is the package
    data the demo reads, not a copy that could drift."""
    from align.demo.pipeline import DemoConfig, shipped_dataset, shipped_recipes

    assert (REPO / "recipes").resolve() == shipped_recipes().resolve() == PACKAGE / "recipes"
    assert DemoConfig().recipes_dir() == shipped_recipes()
    assert shipped_dataset().is_file()


def test_no_module_of_align_imports_the_research_package():
    """lab/ (synthetic problems, meta-training) is not installed: align must not need it."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            if any(name == "lab" or name.startswith("lab.") for name in names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_the_wheel_ships_recipes_and_dataset_not_lab_and_works_outside_a_checkout(tmp_path):
    pytest.importorskip("setuptools")
    # Built from a copy: an in-tree build would share build/ with anyone else's build.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(
        PACKAGE, source / "align", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(dist)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (wheel,) = dist.glob("align-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    missing = _shipped_files() - names
    assert not missing, f"not in the wheel: {sorted(missing)}"
    for needed in (
        "align/recipes/parm_cpu.yaml",
        "align/recipes/evaluate/positive_brief.yaml",
        "align/recipes/merging/ties.yaml",
        "align/recipes/data/positive_brief.jsonl",
        "align/mograd/learned/weights/ml2o_default.safetensors",
    ):
        assert needed in names
    research = [
        n
        for n in names
        if n.split("/")[0] in {"lab", "tests", "evaluation", "recipes"}
        or "synthetic" in n
        or "meta_training" in n
        or "learned/training" in n
    ]
    assert research == []
    (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["align"]

    target = tmp_path / "installed"
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run(
        [sys.executable, "-c", INSTALLED_CHECK],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    installed = target / "align"
    assert Path(found["align"]).parent == installed  # the wheel's copy, not the checkout's
    assert Path(found["recipes"]) == installed / "recipes"
    assert Path(found["data"]) == installed / "recipes" / "data" / "positive_brief.jsonl"
    assert not (elsewhere / "out" / "data").exists()  # the shipped dataset, not a rebuild
    assert found["lab"] is False


def test_every_name_align_lists_imports():
    """The lazy names of ``align`` (a stale one, like the removed ``align.pareto``, fails)."""
    for name in [*align._LAZY, *align._SUBMODULES]:
        assert align.__getattr__(name) is not None, name
    for name in align._SUBMODULES:
        assert isinstance(importlib.import_module(f"align.{name}"), type(align))
    for name in align.__all__:
        assert getattr(align, name) is not None, name
    assert "pareto" not in align._SUBMODULES
    with pytest.raises(AttributeError):
        align.__getattr__("pareto")
