"""The demo pipeline end to end in miniature (tiny model, a few steps), and the α sweep."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from align.cli import app
from align.sweep import route_metrics, spearman

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from align.testing import tiny_causal_lm

    folder = tmp_path_factory.mktemp("tiny-model")
    model, tokenizer = tiny_causal_lm(seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_the_demo_with_rl_trains_and_sweeps_an_online_policy(tmp_path, tiny_folder):
    """``align demo --with-rl``: a PBLoRA policy trained by mo_grpo against the objectives'
    scorers on the dataset's prompts, swept at every α as a route of its own."""
    from align.demo import DemoConfig, run_demo

    config = DemoConfig(
        model=str(tiny_folder),
        output=str(tmp_path / "demo"),
        data=str(DATA / "positive_brief_small.jsonl"),
        parm_steps=1,
        arm_steps=1,
        soup=False,
        with_rl=True,
        rl_steps=1,
        eval_prompts=2,
        grid=2,
        max_new_tokens=4,
        batch_size=2,
        overrides=("args.save_steps=1",),
    )
    report = run_demo(config, log=lambda *_: None)
    assert "MO-GRPO policy" in report["routes"]
    assert np.asarray(report["routes"]["MO-GRPO policy"]["means"]).shape == (3, 2)
    info = json.loads(
        (tmp_path / "demo" / "rl-policy" / "final" / "align_training.json").read_text()
    )
    assert info["trainer"] == "MOGRPOTrainer" and info["conditioned"]
    assert info["rewards"]["positive"] == "positivity"
    assert "train RL policy" in report["timings"]


def test_a_miniature_demo_builds_data_trains_merges_sweeps_and_reports(tmp_path, tiny_folder):
    from align.demo import DemoConfig, run_demo

    # A random tiny model's answers carry no sentiment (every pair a tie): train on real pairs.
    config = DemoConfig(
        model=str(tiny_folder),
        output=str(tmp_path / "demo"),
        data=str(DATA / "positive_brief_small.jsonl"),
        parm_steps=2,
        arm_steps=2,
        eval_prompts=3,
        grid=2,
        max_new_tokens=6,
        batch_size=3,
        overrides=("args.save_steps=1", "args.logging_steps=1"),
    )
    report = run_demo(config, log=lambda *_: None)
    folder = tmp_path / "demo" / "report"
    assert {p.name for p in folder.iterdir()} >= {"front.png", "report.json", "summary.md"}
    assert (folder / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((folder / "report.json").read_text())
    assert saved["routes"].keys() == {"base", "PARM", "GenARM", "rewarded soup"}
    for name in ("PARM", "GenARM", "rewarded soup"):
        route = saved["routes"][name]
        assert np.allclose(route["alphas"], [[0, 1], [0.5, 0.5], [1, 0]])
        assert np.asarray(route["means"]).shape == (3, 2)
        assert "mip" in saved["metrics"]["routes"][name]
    assert len(saved["routes"]["base"]["means"]) == 1
    summary = (folder / "summary.md").read_text()
    assert "| PARM | 3 |" in summary and "hypervolume" in summary
    assert "dominates the base" in summary and set(saved["metrics"]["dominates_base"]) == (
        set(saved["routes"]) - {"base"}
    )
    assert report["timings"].keys() >= {"data", "train PARM", "sweep"}

    # A re-run reuses every stage: nothing is trained or generated again.
    made = {
        path: path.stat().st_mtime_ns
        for path in (tmp_path / "demo").rglob("*")
        if path.suffix in (".safetensors", ".json") and "report" not in path.parts
    }
    assert any("generations" in str(path) for path in made)
    again = run_demo(config, log=lambda *_: None)
    assert again["routes"]["PARM"]["means"] == report["routes"]["PARM"]["means"]
    assert {path: path.stat().st_mtime_ns for path in made} == made
    # Stages are keyed by content, not paths: the run folder and its dataset moved elsewhere
    # (another clone, a copied ablation) are reused as they are.
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "demo", moved / "demo")
    shutil.copy2(config.data, moved / "pairs.jsonl")
    copied = {moved / path.relative_to(tmp_path): mtime for path, mtime in made.items()}
    assert {path: path.stat().st_mtime_ns for path in copied} == copied  # copytree keeps them
    elsewhere = run_demo(
        replace(config, output=str(moved / "demo"), data=str(moved / "pairs.jsonl")),
        log=lambda *_: None,
    )
    assert {r["generations"] for r in elsewhere["routes"].values()} == {"reused"}
    assert {path: path.stat().st_mtime_ns for path in copied} == copied
    # A changed setting redoes the stages that use it (here: the ARMs, the soup and the sweep).
    changed = run_demo(replace(config, arm_steps=1), log=lambda *_: None)
    assert changed["demo_config"]["arm_steps"] == 1
    arm = tmp_path / "demo" / "arm-brief" / "final" / "adapter_model.safetensors"
    assert arm.stat().st_mtime_ns != made[arm]
    # The soup of the retrained ARMs is merged again.
    soup = [path for path in made if path.relative_to(tmp_path / "demo").parts[0] == "soup"]
    remade = [path for path in soup if path.exists()]
    assert remade and all(path.stat().st_mtime_ns != made[path] for path in remade)
    # The sweep answers again with every route that uses an ARM; the PARM's are reused.
    assert {name: route["generations"] for name, route in changed["routes"].items()} == {
        "base": "reused",
        "PARM": "reused",
        "GenARM": "generated",
        "rewarded soup": "generated",
    }


def test_the_demo_runs_any_dataset_with_its_objectives_and_scorers(tmp_path, tiny_folder):
    from align.demo import DemoConfig, run_demo

    # Three objectives: "calm" labels each pair the opposite way to "positive".
    data = tmp_path / "three.jsonl"
    with open(DATA / "positive_brief_small.jsonl") as lines, open(data, "w") as out:
        for line in lines:
            record = json.loads(line)
            positive = record["preferred_positive"]
            record["preferred_calm"] = positive if positive == -1 else 1 - positive
            out.write(json.dumps(record) + "\n")
    config = DemoConfig(
        model=str(tiny_folder),
        output=str(tmp_path / "demo"),
        data=str(data),
        parm_steps=1,
        arm_steps=1,
        soup=False,
        eval_prompts=2,
        grid=1,
        max_new_tokens=4,
        batch_size=2,
    )
    with pytest.raises(ValueError, match=r"objectives \['positive', 'brief', 'calm'\]: name"):
        run_demo(config, log=lambda *_: None)
    with pytest.raises(ValueError, match="unknown scorer 'kindness'"):
        run_demo(
            replace(config, objectives={"calm": "kindness", "brief": "brevity"}),
            log=lambda *_: None,
        )
    with pytest.raises(ValueError, match="two or more objectives"):
        run_demo(replace(config, objectives={"calm": "positivity"}), log=lambda *_: None)
    objectives = {"positive": "positivity", "brief": "brevity", "calm": "positivity"}
    report = run_demo(replace(config, objectives=objectives), log=lambda *_: None)
    assert report["objectives"] == list(objectives)
    arms = sorted(p.name for p in (tmp_path / "demo").glob("arm-*") if p.is_dir())
    assert arms == ["arm-brief", "arm-calm", "arm-positive"]
    parm = json.loads((tmp_path / "demo" / "parm" / "final" / "adapter_config.json").read_text())
    assert parm["objectives"] == list(objectives)
    for name in ("PARM", "GenARM"):  # grid 1: the three vertices of the simplex
        alphas = sorted(map(tuple, report["routes"][name]["alphas"]))
        assert np.allclose(alphas, sorted(map(tuple, np.eye(3))))
        assert np.asarray(report["routes"][name]["means"]).shape == (3, 3)


def test_a_retrained_arm_regenerates_exactly_the_routes_that_use_it(tmp_path, tiny_folder):
    """Generations are keyed by what the adapters contain, not by their paths."""
    from align.demo.pipeline import DemoConfig, train_stage
    from align.sweep import SweepConfig, run_sweep

    demo = DemoConfig(model=str(tiny_folder), output=str(tmp_path))
    data = DATA / "positive_brief_small.jsonl"

    def train(recipe: str, folder: str, *extra: str) -> str:
        overrides = ["args.max_steps=1", "args.save_steps=1", *extra]
        return str(train_stage(demo, recipe, tmp_path / folder, data, overrides))

    parm = train("parm_cpu.yaml", "parm")
    arms = {
        o: train("genarm_cpu.yaml", f"arm-{o}", f"args.objectives=[{o}]")
        for o in ("positive", "brief")
    }
    config = SweepConfig(
        base=str(tiny_folder),
        objectives=["positive", "brief"],
        scorers={"positive": "positivity", "brief": "brevity"},
        routes=[
            {"name": "base", "kind": "base"},
            {"name": "PARM", "kind": "parm", "adapter": parm},
            {"name": "GenARM", "kind": "genarm", "arms": arms},
        ],
        output=str(tmp_path / "report"),
        prompts={"limit": 2},
        grid=1,
        generation={"max_new_tokens": 4, "batch_size": 2, "do_sample": False},
    )
    first = run_sweep(config, show_progress=False, write=False)
    assert {r["generations"] for r in first["routes"].values()} == {"generated"}
    again = run_sweep(config, show_progress=False, write=False)
    assert {r["generations"] for r in again["routes"].values()} == {"reused"}
    # The brief ARM retrained in place (another seed): same path, new weights.
    before = (Path(arms["brief"]) / "adapter_model.safetensors").read_bytes()
    assert (
        train("genarm_cpu.yaml", "arm-brief", "args.objectives=[brief]", "args.seed=1")
        == arms["brief"]
    )
    assert (Path(arms["brief"]) / "adapter_model.safetensors").read_bytes() != before
    after = run_sweep(config, show_progress=False, write=False)
    assert {name: r["generations"] for name, r in after["routes"].items()} == {
        "base": "reused",
        "PARM": "reused",
        "GenARM": "generated",
    }


def test_the_dataset_builder_pairs_every_two_styled_answers_and_writes_a_card(
    tmp_path, tiny_folder
):
    from align.data import load_preference_data, load_prompts
    from align.demo.dataset import build_demo_dataset, write_demo_dataset

    dataset, facts = build_demo_dataset(
        str(tiny_folder), num_prompts=4, max_new_tokens=6, batch_size=4, show_progress=False
    )
    path = write_demo_dataset(dataset, facts, tmp_path / "pb.jsonl")
    loaded = load_preference_data(path)
    assert len(loaded) == facts["pairs"] == 4 * 6
    assert set(loaded["prompt"]) == {r["prompt"] for r in load_prompts(limit=4)}
    assert facts["decided"]["brief"] == sum(label != -1 for label in loaded["preferred_brief"])
    correlations = facts["unstyled_answers"]["correlations"]
    assert "positivity~brevity" in correlations and len(correlations) == 6
    card = (tmp_path / "pb.md").read_text()
    assert card.startswith("# positive_brief") and "positivity vs brevity" in card
    # Re-measuring keeps the answers and reproduces the builder's unstyled sampling exactly.
    from align.demo.dataset import remeasure_demo_dataset

    again, refreshed = remeasure_demo_dataset(path, batch_size=4, show_progress=False)
    assert again["response_0"] == loaded["response_0"]
    assert again["preferred_brief"] == loaded["preferred_brief"]
    same = json.dumps(refreshed["unstyled_answers"]) == json.dumps(facts["unstyled_answers"])
    assert same  # compared as JSON: a constant scorer's correlation is NaN on both sides


def test_a_non_answer_never_wins_the_brief_label():
    from align.demo.dataset import brief_label

    assert brief_label((2, 30), (False, True), tie=3) == 1  # "Ok." loses to a real answer
    assert brief_label((30, 2), (True, False), tie=3) == 0
    assert brief_label((1, 2), (False, False), tie=3) == -1
    assert brief_label((10, 30), (True, True), tie=3) == 0
    assert brief_label((10, 11), (True, True), tie=3) == -1


def test_spearman_and_route_metrics_properties():
    assert spearman([0, 0.5, 1], [1, 2, 3]) == pytest.approx(1.0)
    assert spearman([0, 0.5, 1], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([0, 0.5, 1], [2, 2, 2]))
    alphas = [[0, 1], [0.5, 0.5], [1, 0]]
    good = {"alphas": alphas, "means": [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]}
    bad = {"alphas": alphas, "means": [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]}  # the wrong way round
    inner = {"alphas": alphas, "means": [[0.1, 0.4], [0.2, 0.2], [0.3, 0.1]]}
    bounds = [[0, 1], [0, 1]]
    metrics = route_metrics({"good": good, "bad": bad, "inner": inner}, ["a", "b"], bounds)
    metrics = metrics["routes"]
    assert metrics["good"]["mip"] > metrics["bad"]["mip"]
    assert metrics["good"]["spearman"] == {"a": 1.0, "b": 1.0}
    assert metrics["good"]["hypervolume"] == pytest.approx(metrics["bad"]["hypervolume"])
    assert metrics["inner"]["hypervolume"] < metrics["good"]["hypervolume"]
    # On the unit box the three points of `good` dominate 0.5 of it (0.25 below the middle one
    # and the two line segments add no area).
    assert metrics["good"]["hypervolume"] == pytest.approx(0.25)


def test_a_routes_figures_do_not_depend_on_the_other_routes():
    rng = np.random.default_rng(0)
    alphas = [[a, 1 - a] for a in np.linspace(0, 1, 6)]
    routes = {
        name: {"alphas": alphas, "means": rng.uniform([-1, 0], [1, 1], size=(6, 2)).tolist()}
        for name in ("one", "two", "three")
    }
    bounds = [[-1, 1], [0, 1]]
    everything = route_metrics(routes, ["p", "b"], bounds)
    for left_out in routes:
        rest = {k: v for k, v in routes.items() if k != left_out}
        fewer = route_metrics(rest, ["p", "b"], bounds)
        for name in rest:
            assert fewer["routes"][name] == everything["routes"][name]
        assert fewer["reference_point"] == everything["reference_point"] == [-1.0, 0.0]
    # Hypervolume is a fraction of the score box: a point at the best corner dominates all of it.
    best = route_metrics({"x": {"alphas": [[0.5, 0.5]], "means": [[1.0, 1.0]]}}, ["p", "b"], bounds)
    assert best["routes"]["x"]["hypervolume"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="bounds"):
        route_metrics(routes, ["p", "b"], [[0, 1]])
    # Against the untuned base, when the sweep has one: which fronts dominate its point.
    assert everything["dominates_base"] == {}
    with_base = {
        "base": {"kind": "base", "alphas": [[0.5, 0.5]], "means": [[0.41, 0.001]]},
        "over": {"alphas": alphas[:2], "means": [[0.72, 0.0], [0.45, 0.01]]},
        "short": {"alphas": alphas[:2], "means": [[0.72, 0.0], [0.32, 0.47]]},
    }
    assert route_metrics(with_base, ["p", "b"], bounds)["dominates_base"] == {
        "over": True,
        "short": False,
    }


def test_evaluate_explains_a_bad_config(tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text(
        "base: smollm2-135m-instruct\nobjectives: [positive, brief]\n"
        "scorers: {positive: positivity}\nroutes: [{kind: base}]\noutput: out\n"
    )
    result = CliRunner().invoke(app, ["evaluate", str(config)])
    assert result.exit_code == 2
    assert "one scorer per objective" in result.output
    config.write_text(
        "base: smollm2-135m-instruct\nobjectives: [positive, brief]\n"
        "scorers: {positive: positivity, brief: brevity}\nroutes: [{kind: magic}]\noutput: out\n"
    )
    result = CliRunner().invoke(app, ["evaluate", str(config)])
    assert result.exit_code == 2
    assert "route 'magic': unknown route kind 'magic'; available: base, genarm" in result.output


@pytest.mark.parametrize("name", ["positive_brief.yaml", "pku_saferlhf.yaml"])
def test_the_shipped_evaluation_configs_are_valid(name):
    from align.sweep import build_route, load_sweep_config

    path = Path(__file__).parents[1] / "recipes" / "evaluate" / name
    config = load_sweep_config(path, ["output=somewhere"])
    assert config.output == "somewhere" and len(config.objectives) == 2
    kinds = {
        build_route(spec, config.objectives, config.generation).kind
        for spec in config.routes
        if spec["kind"] != "merged"
    }
    assert "parm" in kinds and "genarm" in kinds


def test_the_shipped_positive_brief_config_is_the_demos_sweep():
    """`align evaluate recipes/evaluate/positive_brief.yaml` after `align demo` says it repeats
    the demo's sweep: the same prompts, grid, decoding and β."""
    from align.demo.pipeline import EVAL_PROMPT_OFFSET, DemoConfig
    from align.sweep import load_sweep_config

    path = Path(__file__).parents[1] / "recipes" / "evaluate" / "positive_brief.yaml"
    config, demo = load_sweep_config(path), DemoConfig()
    assert config.prompts == {"offset": EVAL_PROMPT_OFFSET, "limit": demo.eval_prompts}
    assert config.grid == demo.grid
    assert config.generation["max_new_tokens"] == demo.max_new_tokens
    assert config.generation["batch_size"] == demo.batch_size
    assert config.generation["do_sample"] is False
    guided = [r for r in config.routes if r["kind"] in ("parm", "genarm")]
    assert len(guided) == 2 and all(r["beta"] == demo.beta for r in guided)


def test_a_soup_sweep_in_one_weighted_pass_equals_each_merged_alpha_alone(
    tmp_path, tiny_folder, monkeypatch
):
    """The ARMs on the shared base at once, each row weighting their updates by its α: the
    answers of each α's merged adapter loaded alone; a retrained ARM (the merge now stale)
    falls back to the merged folders; the base is left bare."""
    import torch
    from peft import LoraConfig, get_peft_model

    from align.merging.lora import merge_lora_adapters
    from align.models import load_model
    from align.sweep.routes import MergedRoute, Runtime

    def lora(seed: int, folder: Path) -> None:
        model, _ = load_model(str(tiny_folder))
        torch.manual_seed(seed)  # A's init too: the same adapters whatever ran before
        adapter = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for name, param in adapter.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)  # LoRA starts at B = 0: make each adapter matter
        adapter.save_pretrained(folder)

    arms = {o: tmp_path / o for o in ("positive", "brief")}
    for seed, folder in enumerate(arms.values()):
        lora(seed, folder)
    # Merged with paths relative to the working folder, read from another one: the records
    # name the inputs by absolute path, so the one weighted pass still finds them.
    monkeypatch.chdir(tmp_path)
    merge_lora_adapters({o: o for o in arms}, "soup", sweep=2)
    monkeypatch.chdir(tiny_folder)
    generation = {"max_new_tokens": 6, "batch_size": 2, "do_sample": False}
    route = MergedRoute("soup", ["positive", "brief"], generation, path=str(tmp_path / "soup"))
    runtime = Runtime(str(tiny_folder))
    assert route.interpolated_sources(str(tiny_folder)) == {k: str(v) for k, v in arms.items()}
    prompts = ["Say hi.", "Describe a calm lake at dawn in detail.", "Name a colour."]
    alphas = route.alphas(np.zeros((1, 2)))
    together = route.answer_all(runtime, prompts, alphas)  # 2 prompts × 3 α, then 1 × 3
    alone = [route.answer(runtime, prompts, alpha) for alpha in alphas]
    assert together == alone
    assert len({tuple(a) for a in alone}) > 1  # the α values answer differently
    # A token the answers repeat made the end of turn: rows finish at different steps and leave
    # the batch, their weights with them; each α decoded alone must still agree.
    from collections import Counter

    from align.chat import encode_prompts
    from align.decoding import lora_soup
    from align.preference import Preference

    # The token ids the soup rows really decode (re-encoding the texts need not give them back).
    batch = encode_prompts(runtime.tokenizer, prompts * len(alphas))
    sources = route.interpolated_sources(str(tiny_folder))
    with lora_soup(runtime.model, sources) as guidance, torch.no_grad():
        rows = torch.as_tensor(alphas).repeat_interleave(len(prompts), dim=0)
        guidance.set_preference(Preference(rows, guidance.objectives))
        pad = runtime.tokenizer.pad_token_id
        ids = runtime.model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=pad)
    # The token found after the first position in the most rows.
    later = Counter(
        t for row in ids[:, batch["input_ids"].shape[1] + 1 :].tolist() for t in set(row)
    )
    later.pop(pad, None)
    decoded = runtime.tokenizer.decode
    # A word (not a byte piece, whose loss the decoded text may not show).
    runtime.tokenizer.eos_token_id = next(
        t for t, _ in later.most_common() if decoded([t]).strip().isalpha()
    )
    early = route.answer_all(runtime, prompts, alphas)
    assert early == [route.answer_all(runtime, prompts, alphas[k : k + 1])[0] for k in range(3)]
    assert early != alone  # the stop token ended rows early (nothing else changed)
    runtime.tokenizer.eos_token_id = runtime.model.generation_config.eos_token_id
    lora(7, arms["brief"])  # retrained in place: the merged folders no longer match it
    assert route.interpolated_sources(str(tiny_folder)) is None
    assert route.answer_all(runtime, prompts, alphas) == alone


def test_the_demo_refuses_several_processes_before_touching_its_folder(tmp_path, monkeypatch):
    from align.demo.pipeline import DemoConfig, run_demo

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="one process"):
        run_demo(DemoConfig(output=str(tmp_path / "demo")))
    assert not (tmp_path / "demo").exists()


@pytest.fixture(scope="module")
def parm_ablation():
    import importlib.util
    import sys

    path = Path(__file__).parents[1] / "evaluation" / "parm_ablation.py"
    spec = importlib.util.spec_from_file_location("parm_ablation", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["parm_ablation"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["parm_ablation"]


def test_every_parm_ablation_variant_is_a_valid_distinct_change_of_the_recipe(parm_ablation):
    """A misspelt field or a stale override would train the demo's recipe under another name."""
    from align.config import build_training_args
    from align.train import load_recipe
    from align.trainers.registry import TRAINERS

    recipe_path = Path(__file__).parents[1] / "recipes" / "parm_cpu.yaml"
    config_class = TRAINERS.get("parm").config_class
    seen = {}
    for name, (_, overrides) in parm_ablation.VARIANTS.items():
        if name == "genarm":
            continue
        recipe = load_recipe(recipe_path, overrides)
        args = build_training_args(config_class, recipe["args"], name, "{}")
        key = json.dumps(recipe["args"], sort_keys=True)
        assert key not in seen, f"{name} trains the same recipe as {seen.get(key)}"
        seen[key] = name
        if name == "demo":
            assert not overrides and args.preference_sampling == "pair"
        if name == "recipe":  # the recipe before the ablation, which its early rows change
            assert args.preference_sampling == "batch" and args.alpha_path_lr_ratio == 1
            assert (args.pblora_r2, args.lora_alpha) == (4, 8)


def test_parm_ablation_refuses_overrides_without_a_tag_and_unknown_variants(
    parm_ablation, tmp_path
):
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command()(parm_ablation.main)
    result = CliRunner().invoke(app, ["--out", str(tmp_path), "-v", "demo", "--set", "args.seed=3"])
    assert result.exit_code == 2 and "--set needs --tag" in result.output
    assert not any(tmp_path.iterdir())
    result = CliRunner().invoke(app, ["--out", str(tmp_path), "-v", "nope"])
    assert result.exit_code == 2 and "unknown variants ['nope']" in result.output


def test_a_training_stage_is_identified_by_content_not_by_paths(tmp_path):
    from align.demo.pipeline import training_identity
    from align.train import load_recipe

    recipe = Path(__file__).parents[1] / "recipes" / "parm_cpu.yaml"
    pairs = tmp_path / "a" / "pairs.jsonl"
    pairs.parent.mkdir()
    shutil.copy2(DATA / "positive_brief_small.jsonl", pairs)

    def identity(data: Path, output: str, *extra: str) -> dict:
        loaded = load_recipe(recipe, [f"data.path={data}", f"args.output_dir={output}", *extra])
        return training_identity({**loaded, "model": "smollm2-135m-instruct"})

    first = identity(pairs, str(tmp_path / "run"))
    (tmp_path / "b").mkdir()
    shutil.copy2(pairs, tmp_path / "b" / "other-name.jsonl")
    assert identity(tmp_path / "b" / "other-name.jsonl", str(tmp_path / "moved")) == first
    assert identity(pairs, str(tmp_path / "run"), "args.learning_rate=0.5") != first
    with pairs.open("a") as handle:  # one more pair: another dataset
        handle.write(pairs.read_text().splitlines()[0] + "\n")
    assert identity(pairs, str(tmp_path / "run")) != first


def test_arm_token_nll_is_the_mean_answer_token_nll_and_refuses_bad_input(tmp_path, tiny_folder):
    import importlib.util
    import math

    import torch
    import typer
    from typer.testing import CliRunner

    from align.models import load_model

    path = Path(__file__).parents[1] / "evaluation" / "arm_token_nll.py"
    spec = importlib.util.spec_from_file_location("arm_token_nll", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model, tokenizer = load_model(str(tiny_folder))
    rows = [json.loads(line) for line in (DATA / "positive_brief_small.jsonl").open()][:2]
    assert module.mean_token_nll(model, tokenizer, rows) > 0
    # All logits equal (the head zeroed): every answer token costs exactly log(vocab).
    with torch.no_grad():
        model.lm_head.weight.zero_()
    uniform = module.mean_token_nll(model, tokenizer, rows)
    assert abs(uniform - math.log(model.config.vocab_size)) < 1e-4
    app = typer.Typer()
    app.command()(module.main)
    result = CliRunner().invoke(app, [str(tmp_path), "--pairs", "0"])
    assert result.exit_code == 2 and "--pairs must be >= 1" in result.output
    result = CliRunner().invoke(app, [str(tmp_path), "--data", str(tmp_path / "none.jsonl")])
    assert result.exit_code == 2 and "no data at" in result.output
