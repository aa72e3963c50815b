"""One registry type for every named thing, one config path for every YAML file."""

import subprocess
import sys

import pytest

from align.config import ConfigError
from align.registry import Registry, UnknownNameError


def all_registries() -> dict[str, Registry]:
    import align.adapters  # noqa: F401 — registers the tuners
    from align.adapters.base import ADAPTERS
    from align.merging.registry import METHODS as MERGES
    from align.mograd.registry import METHODS as MOGRAD
    from align.scorers.base import SCORERS
    from align.sweep.routes import ROUTES
    from align.trainers.registry import TRAINERS

    return {
        "adapters": ADAPTERS,
        "merges": MERGES,
        "mograd": MOGRAD,
        "scorers": SCORERS,
        "routes": ROUTES,
        "trainers": TRAINERS,
    }


EXPECTED = {
    "adapters": {"PBLORA", "SVDLORA"},
    "merges": {"linear", "ties", "dare_ties", "slerp", "model_stock", "della", "lora", "pareto"},
    "mograd": {"linear", "tchebycheff", "mgda", "upgrad", "ml2o", "gml2o", "gram_l2o"},
    "scorers": {"positivity", "brevity", "relevance", "harmlessness", "reward-model"},
    "routes": {"base", "parm", "genarm", "mod", "policy", "merged"},
    "trainers": {"arm", "parm", "dpo"},
}


@pytest.mark.parametrize("which", sorted(EXPECTED))
def test_every_registry_is_one_type_with_one_lookup_and_one_error(which):
    registry = all_registries()[which]
    assert isinstance(registry, Registry)
    assert EXPECTED[which] <= set(registry.names())
    for name in registry.names():
        # names match case-insensitively, "-" read as "_"
        assert registry.get(name.upper().replace("_", "-")) is registry.get(name)
        assert name in registry
    with pytest.raises(UnknownNameError, match=r"unknown .+ 'no-such-thing'; available: ") as info:
        registry.get("no-such-thing")
    assert all(name in str(info.value) for name in registry.names())
    assert isinstance(info.value, ValueError)  # the CLI prints it as one `error:` line


def test_a_registry_refuses_a_taken_name_and_builds_with_named_errors():
    registry = Registry("widget", attribute="widget_name")

    @registry.register("round-widget", "circle")
    class Round:
        def __init__(self, size: int = 1):
            self.size = size

    assert Round.widget_name == "round-widget" and registry.get("CIRCLE") is Round
    assert registry.build("round_widget", size=3).size == 3
    with pytest.raises(ValueError, match="bad options for widget 'round_widget'"):
        registry.build("round-widget", colour="red")
    with pytest.raises(ValueError, match="'circle' is already taken"):
        registry.register("circle")(type("Other", (), {}))


def test_the_kind_of_a_multi_gradient_method_is_its_base_class():
    from align.mograd import get_aggregator
    from align.mograd.base import GradientAggregator, LossAggregator, UpdateAggregator

    kinds = {LossAggregator: "loss", GradientAggregator: "gradient", UpdateAggregator: "update"}
    for name, expected in (("linear", "loss"), ("mgda", "gradient"), ("ml2o", "update")):
        method = get_aggregator(name)
        (base,) = [cls for cls in kinds if isinstance(method, cls)]
        assert kinds[base] == expected == method.kind
        assert get_aggregator(method) is method  # an instance of any kind passes through


def test_every_merge_method_runs_through_the_registry():
    from align.merging.base import Merge
    from align.merging.engine import MergeMethod
    from align.merging.registry import METHODS, get_merge_method

    for name in METHODS.names():
        assert issubclass(METHODS.get(name), Merge)
    assert not isinstance(get_merge_method("lora"), MergeMethod)  # a merge of its own kind
    assert METHODS.get("pareto").trains_artifact
    with pytest.raises(ValueError, match="merge method 'pareto' does not take 'densty'"):
        get_merge_method("pareto", densty=0.5)


def test_research_code_stays_off_the_runtime_import_path():
    code = (
        "import sys, align, align.adapters, align.sweep, align.merging, align.mograd\n"
        "from align.mograd.registry import METHODS\n"
        "from align.merging.registry import METHODS as MERGES\n"
        "METHODS.names(); MERGES.names()\n"
        "loaded = [m for m in sys.modules if m == 'lab' or m.startswith(('align.testing', "
        "'lab.'))]\n"
        "print(loaded)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert result.stdout.strip() == "[]", result.stdout


# --- one config path ------------------------------------------------------------------------


def _recipe(tmp_path, extra: str) -> str:
    data = tmp_path / "pairs.jsonl"
    data.write_text("")
    return (
        f"trainer: parm\ndata: {{path: {data}}}\nargs: {{output_dir: {tmp_path / 'out'}}}\n" + extra
    )


CONFIGS = {
    "recipe": lambda tmp_path, extra: _recipe(tmp_path, extra),
    "evaluation config": lambda tmp_path, extra: (
        "base: tiny\nobjectives: [a, b]\nscorers: {a: positivity, b: brevity}\n"
        "routes: [{kind: base}]\noutput: out\n" + extra
    ),
    "merge config": lambda tmp_path, extra: (
        "merge_method: linear\nmodels: [{model: x, objective: a}, {model: y, objective: b}]\n"
        "sweep: 2\n" + extra
    ),
}


def _load(what: str, path):
    from align.merging.config import load_merge_config
    from align.sweep.run import load_sweep_config
    from align.train import load_recipe

    return {
        "recipe": load_recipe,
        "evaluation config": load_sweep_config,
        "merge config": load_merge_config,
    }[what](path)


@pytest.mark.parametrize("what", sorted(CONFIGS))
def test_every_config_file_reads_through_one_path_with_the_same_errors(tmp_path, what):
    path = tmp_path / "config.yaml"

    path.write_text(CONFIGS[what](tmp_path, "colour: red\n"))
    with pytest.raises(ConfigError, match=rf"unknown {what} fields \['colour'\]"):
        _load(what, path)

    path.write_text(CONFIGS[what](tmp_path, "colour: [red\n"))
    with pytest.raises(ConfigError, match=rf"{what} '.*config.yaml' is not valid YAML: line \d+"):
        _load(what, path)

    with pytest.raises(ConfigError, match=rf"{what} '.*missing.yaml' does not exist"):
        _load(what, tmp_path / "missing.yaml")

    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match=rf"{what} '.*' must be a mapping of fields, got list"):
        _load(what, path)


def test_numbers_and_types_are_read_the_same_way_everywhere(tmp_path):
    from align.config import build_dataclass, read_config
    from align.sweep.run import SweepConfig

    path = tmp_path / "config.yaml"
    path.write_text(CONFIGS["evaluation config"](tmp_path, "grid: 2.5\n"))
    with pytest.raises(ConfigError, match="evaluation config field 'grid' must be an integer"):
        build_dataclass(SweepConfig, read_config(path, "evaluation config"), "evaluation config")
    data = read_config(path, "evaluation config", ["generation.temperature=1e-1", "grid=4"])
    assert data["generation"] == {"temperature": 0.1} and data["grid"] == 4
    path.write_text(CONFIGS["evaluation config"](tmp_path, "").replace("output: out\n", ""))
    with pytest.raises(ConfigError, match=r"evaluation config misses required fields \['output'\]"):
        _load("evaluation config", path)


def test_no_private_imports_across_packages():
    """A private module or name (``_x``) is imported only inside the package that owns it."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    found = []
    for path in sorted([*root.glob("align/**/*.py"), *root.glob("evaluation/**/*.py")]):
        importer = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("align")):
                continue
            parts = node.module.split(".")
            is_package = (root.joinpath(*parts) / "__init__.py").is_file()
            owner = node.module if is_package else ".".join(parts[:-1])
            private_module = any(p.startswith("_") and not p.startswith("__") for p in parts)
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                if (private or private_module) and not importer.startswith(owner):
                    found.append(
                        f"{path.relative_to(root)}: from {node.module} import {alias.name}"
                    )
    assert found == []
