"""Sweeps and batched guided decoding shared by two processes (``accelerate launch``, gloo on the
CPU) give exactly what one process gives: the same report, caches and output rows."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
import yaml
from launching import accelerate_launch

from align.distributed import Shard

# Every launching test here reads one module-wide launch (the `runs` fixture): the stress script
# repeats the module as one unit.
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.multiprocess("module")]
REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Hi",
    "Tell me about the weather on a long rainy day",
    "Why is the sky blue?",
    "Name a colour.",
    "Write two lines about a quiet harbour at night, please.",
]


def _sharp(seed: int):
    """A tiny LM with strong, distinct preferences (see tests/test_guided_decoding.py)."""
    from align.testing import tiny_causal_lm

    model = tiny_causal_lm(seed=seed, tie_word_embeddings=False)[0]
    with torch.no_grad():
        model.lm_head.weight.normal_(std=0.5, generator=torch.Generator().manual_seed(seed))
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A base, a PARM on it, two ARMs, two MOD policies and an exact LoRA soup sweep."""
    from peft import LoraConfig, get_peft_model

    from align.adapters import PBLoraConfig
    from align.merging.lora import merge_lora_adapters
    from align.models import load_model
    from align.testing import tiny_causal_lm

    root = tmp_path_factory.mktemp("shard-models")
    tokenizer = tiny_causal_lm(seed=0)[1]
    base = _sharp(1)  # answers with words (an unsharpened tiny LM answers blank lines)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    torch.manual_seed(7)
    parm = get_peft_model(
        load_model(str(root / "base"))[0],
        PBLoraConfig(objectives=["positive", "brief"], init_weights=False, lora_dropout=0.0),
    )
    with torch.no_grad():
        for name, param in parm.named_parameters():
            if "pblora_B" in name:
                param.mul_(50)  # α visibly changes the PARM
    parm.save_pretrained(root / "parm")
    for name, seed in (
        ("arm-positive", 2),
        ("arm-brief", 3),
        ("pol-positive", 4),
        ("pol-brief", 5),
    ):
        _sharp(seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    for seed, objective in enumerate(("positive", "brief")):
        model, _ = load_model(str(root / "base"))
        torch.manual_seed(seed)
        lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for name, param in lora.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)
        lora.save_pretrained(root / f"lora-{objective}")
    merge_lora_adapters(
        {o: root / f"lora-{o}" for o in ("positive", "brief")}, root / "soup", sweep=2
    )
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return {p.name: p for p in root.iterdir()}


def _sweep_config(tmp_path: Path, models: dict[str, Path]) -> Path:
    arms = {o: str(models[f"arm-{o}"]) for o in ("positive", "brief")}
    policies = {o: str(models[f"pol-{o}"]) for o in ("positive", "brief")}
    config = {
        "base": str(models["base"]),
        "objectives": ["positive", "brief"],
        "scorers": {"positive": "positivity", "brief": "brevity"},
        "routes": [
            {"name": "base", "kind": "base"},
            {"name": "PARM", "kind": "parm", "adapter": str(models["parm"]), "beta": 0.5},
            {"name": "GenARM", "kind": "genarm", "arms": arms, "beta": 0.5},
            {"name": "MOD", "kind": "mod", "policies": policies},
            {"name": "MOD-JS", "kind": "mod", "policies": policies, "divergence": "jensen_shannon"},
            {"name": "soup", "kind": "merged", "path": str(models["soup"])},
        ],
        "output": str(tmp_path / "unused"),
        "prompts": {"path": str(models["prompts.txt"])},
        "grid": 2,
        # 3 prompt batches × 2 α blocks per one-pass route: 33 passes to share out.
        "generation": {
            "max_new_tokens": 6,
            "batch_size": 2,
            "alphas_per_pass": 2,
            "do_sample": False,
        },
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _launch(*arguments: str) -> tuple[float, str]:
    """``accelerate launch`` two CPU processes (gloo) running ``arguments``: its wall time and
    what the processes wrote to stderr."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "ACCELERATE_USE_CPU": "1",  # else `accelerate launch` starts one process
    }
    started = time.perf_counter()
    result = accelerate_launch(
        REPO / "accelerate_configs" / "cpu_2proc.yaml", *arguments, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return time.perf_counter() - started, result.stderr


def _generate_arguments(models: dict[str, Path]) -> list[str]:
    return [
        "--mode",
        "mod",
        "--divergence",
        "jensen_shannon",
        "--arm",
        f"positive={models['pol-positive']}",
        "--arm",
        f"brief={models['pol-brief']}",
        "--base",
        str(models["base"]),
        "--preference",
        "positive=0.3,brief=0.7",
        "--prompts-file",
        str(models["prompts.txt"]),
        "--batch-size",
        "2",
        "--max-new-tokens",
        "6",
        "--sample",
        "--seed",
        "11",  # each batch seeded by its place: the same draws in whichever process
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, models) -> dict[str, Path]:
    """The sweep and the batched guided decoding, each run by one process (here) and by two
    (one ``accelerate launch`` for both commands: they share its start-up)."""
    from typer.testing import CliRunner

    from align.cli import app
    from align.sweep import load_sweep_config, run_sweep

    root = tmp_path_factory.mktemp("shard-runs")
    config = _sweep_config(root, models)
    out = {
        "config": config,
        "one": root / "one" / "report",
        "two": root / "two" / "report",
        "one.jsonl": root / "one.jsonl",
        "two.jsonl": root / "two.jsonl",
    }
    started = time.perf_counter()
    run_sweep(load_sweep_config(config, [f"output={out['one']}"]), show_progress=False)
    single = time.perf_counter() - started
    generate = _generate_arguments(models)
    result = CliRunner().invoke(app, ["generate", *generate, "--output", str(out["one.jsonl"])])
    assert result.exit_code == 0, result.output
    # The two-process sweep finds one route's answers cached (they are reused), and a stale
    # cache of another (another key: answered again, and its cache replaced).
    caches = {name: out[name].parent / "report.generations" for name in ("one", "two")}
    caches["two"].mkdir(parents=True)
    (caches["two"] / "base.json").write_bytes((caches["one"] / "base.json").read_bytes())
    (caches["two"] / "GenARM.json").write_text(json.dumps({"key": "stale", "answers": [["x"]]}))
    seconds, log = _launch(
        str(REPO / "tests" / "distributed" / "shard_commands.py"),
        str(config),
        "--set",
        f"output={out['two']}",
        "--quiet",
        "--",
        *generate,
        "--output",
        str(out["two.jsonl"]),
    )
    print(
        f"\none process: sweep {single:.1f} s (in pytest, imports done); two processes: "
        f"launch, sweep and generate {seconds:.1f} s"
    )
    return out | {f"{name}.cache": folder for name, folder in caches.items()} | {"log": log}


def _shares(log: str, what: str) -> dict[int, tuple[int, int]]:
    """``{rank: (its items, all items)}`` from the processes' ``[align ...]`` lines."""
    found = re.findall(rf"\[align {what}\] process (\d) of 2: (\d+) of (\d+)", log)
    return {int(rank): (int(mine), int(total)) for rank, mine, total in found}


def _without_timings(report: dict) -> dict:
    return {key: value for key, value in report.items() if key != "timings"}


def test_shards_are_contiguous_balanced_and_cover_every_item():
    costs = [6, 6, 6, 3, 2, 2, 1, 6, 6, 3]
    for world in (1, 2, 3, 4):
        owners = Shard(0, world).owners(costs)
        assert owners == sorted(owners)  # contiguous runs, in order
        assert sorted(j for r in range(world) for j in Shard(r, world).mine(costs)) == list(
            range(len(costs))
        )
        loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(world)]
        assert max(loads) - min(loads) <= max(costs)  # no rank more than one item behind
    assert Shard(1, 2).owners([1, 1, 1, 1]) == [0, 0, 1, 1]
    assert Shard(0, 3).owners([]) == []
    assert Shard(0, 2).owners([0, 0]) == [0, 1]  # no cost: shared by count


def test_a_sweep_over_two_processes_writes_the_one_process_report(runs):
    # Both processes decoded passes: 5 one-pass routes (PARM, GenARM, MOD, MOD-JS, the soup) ×
    # 3 prompt batches × 2 α blocks; the base's answers were cached.
    shares = _shares(runs["log"], "sweep")
    assert shares.keys() == {0, 1} and all(mine > 0 for mine, _ in shares.values())
    assert sum(mine for mine, _ in shares.values()) == shares[0][1] == 5 * 6
    report = json.loads((runs["two"] / "report.json").read_text())
    expected = _without_timings(json.loads((runs["one"] / "report.json").read_text()))
    assert {r["generations"] for r in expected["routes"].values()} == {"generated"}
    expected["routes"]["base"]["generations"] = "reused"
    # Scores, fronts, hypervolume, MIP, Spearman, examples: all exactly equal.
    assert _without_timings(report) == expected
    assert (runs["two"] / "summary.md").is_file() and (runs["two"] / "front.png").is_file()
    # Every route's answers, in the caches rank 0 wrote, are the one-process answers (the
    # stale cache replaced, the reused one untouched).
    one, two = runs["one.cache"], runs["two.cache"]
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    for cache in one.iterdir():
        assert (two / cache.name).read_bytes() == cache.read_bytes(), cache.name
    answers = {p.stem: json.loads(p.read_text())["answers"] for p in one.iterdir()}
    for name in ("PARM", "GenARM", "MOD", "MOD-JS", "soup"):
        assert len({tuple(a) for a in answers[name]}) > 1, name  # α changes the answers
    assert answers["MOD"] != answers["MOD-JS"]  # the divergence changes the mixture


def test_generate_over_two_processes_writes_the_one_process_rows(runs):
    assert _shares(runs["log"], "generate") == {0: (1, 3), 1: (2, 3)}  # batches of 2, 2, 1
    assert runs["two.jsonl"].read_bytes() == runs["one.jsonl"].read_bytes()
    rows = [json.loads(line) for line in runs["one.jsonl"].read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert rows[0]["divergence"] == "jensen_shannon"
    # Sampled answers vary with the prompt (two of five may meet by chance on the tiny models).
    assert len({r["response"] for r in rows}) > 1


def test_evaluate_module_reports_a_bad_config_in_one_line(tmp_path, capsys):
    from align.evaluate import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing.yaml")])
    assert str(exit_info.value).startswith("error: evaluation config")


def test_leave_process_group_destroys_the_default_group_once(tmp_path):
    # What every entry point calls on its way out (a gloo group left to interpreter exit can
    # abort a process whose work is done).
    import torch.distributed as dist

    from align.distributed import leave_process_group

    store = tmp_path / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    assert dist.is_initialized()
    leave_process_group()
    assert not dist.is_initialized()
    leave_process_group()  # nothing left to destroy: a no-op
