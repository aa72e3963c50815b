"""``align demo``: multi-objective alignment end to end on the embedded model.

Stages, each cached in the output folder and reused on a re-run when its settings are unchanged:

1. **data** — the shipped ``recipes/data/positive_brief.jsonl`` (real SmolLM2 answers labelled
   by VADER sentiment and token count; :mod:`align.demo.dataset`), or built when missing;
   the recipes and the dataset are package data (``align/recipes/``, which a checkout's
   ``recipes/`` links to): an installed align finds them outside a checkout;
2. **parm** — one PARM trained on both objectives (``recipes/parm_cpu.yaml``);
3. **arms** — one GenARM ARM per objective (``recipes/genarm_cpu.yaml``);
4. **policy** (``--with-dpo``) — an SVD-LoRA policy trained by preference DPO
   (``recipes/dpo_cpu.yaml``); **rl-policy** (``--with-rl``) — a PBLoRA policy trained online by
   multi-objective GRPO against the objectives' scorers on the dataset's prompts
   (``recipes/mo_grpo_cpu.yaml``);
5. **soup** — rewarded soups: the single-objective ARMs, used as policies, merged exactly
   along α (``align.merging``, LoRA interpolation) into one adapter per α;
6. **sweep** — the 11-point α grid through every route (base, PARM-guided, GenARM-guided,
   soup, policy) on held-out prompts, every answer scored;
7. **report** — ``front.png``, ``report.json`` and ``summary.md`` (hypervolume, MIP,
   Spearman ρ of each objective's score against its α).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from align.io import atomic_file

#: The last 30 shipped prompts never reach the demo's training data: the sweep answers them.
EVAL_PROMPT_OFFSET = 270
#: The shipped dataset's objectives, each with the scorer that measures it in the sweep.
SHIPPED_OBJECTIVES = {"positive": "positivity", "brief": "brevity"}


def shipped_recipes() -> Path:
    """The recipes align ships: ``align/recipes/`` of the installed package (package data; in a
    checkout, what ``recipes/`` at the repository root links to)."""
    from importlib import resources

    return Path(str(resources.files("align").joinpath("recipes")))


def shipped_dataset() -> Path:
    """The demo's shipped dataset (real SmolLM2 answers, ``recipes/data/positive_brief.jsonl``)."""
    return shipped_recipes() / "data" / "positive_brief.jsonl"


@dataclass
class DemoConfig:
    """Every setting of the demo; a stage is redone only when the settings it uses change."""

    model: str = "smollm2-135m-instruct"
    output: str = "runs/demo"  # ignored by git: a demo run leaves a checkout clean
    data: str | None = None  # None: the shipped dataset (built into output/ when missing)
    data_prompts: int = 160  # prompts answered when the dataset is built here
    #: Objective → scorer (``align scorers``); None: the shipped dataset's. Any dataset with two
    #: or more objectives runs: one PARM on all of them, one ARM each, soups along all of them.
    objectives: dict[str, str] | None = None
    recipes: str | None = None  # None: the shipped recipes (shipped_recipes())
    # 40 PARM steps and 20 per ARM (the same pairs budget) keep `make demo` within 15 minutes on
    # 2 CPU cores; 60 / 30 reach further (the README's ablation table).
    parm_steps: int = 40
    arm_steps: int = 20
    dpo_steps: int = 30
    with_dpo: bool = False
    #: ``--with-rl``: one α-conditioned PBLoRA policy trained online (``recipes/mo_grpo_cpu.yaml``,
    #: GRPO against the objectives' scorers, 8 completions a step): ~15 s a step here, so it
    #: does not fit the default demo's 15 minutes.
    rl_steps: int = 120
    with_rl: bool = False
    soup: bool = True
    # Every held-out prompt (30) at the 11 α of the papers' protocol (ANCHORS: (0, 1), (0.1,
    # 0.9), ..., (1, 0)). 16 prompts left the soups' ρ(positive) to noise (0.73 on 16, 0.85 on
    # 30); 6 α left the PARM-GenARM ranking to the grid (PARM ahead on 6 α, behind on 11 at
    # β 1) and no soup between α_positive 0.8 and 1, so the soups' front missed the base.
    eval_prompts: int = 300 - EVAL_PROMPT_OFFSET
    grid: int = 10
    max_new_tokens: int = 48
    batch_size: int = 24
    # Guidance β for the PARM and GenARM alike (reward weighted 1/β): on the demo's sweep 0.75
    # beat 1 and 0.5 for the PARM and matched 1 for GenARM (the README's table); at 60 steps
    # β 0.5 broke GenARM's brief end (the ablation).
    beta: float = 0.75
    seed: int = 0
    #: Extra recipe overrides for every training stage (``args.max_length=128`` ...).
    overrides: tuple[str, ...] = ()

    def recipes_dir(self) -> Path:
        folder = Path(self.recipes) if self.recipes else shipped_recipes()
        if not (folder / "parm_cpu.yaml").is_file():
            where = "" if self.recipes else " (align's installation lacks its package data)"
            raise FileNotFoundError(
                f"the demo's recipes are not in {folder}{where}: pass --recipes DIR, a folder "
                "with align's recipes (recipes/ of a clone)"
            )
        return folder


def _stamp(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


class Stage:
    """A cached step: ``done()`` when its folder holds a result made with the same settings."""

    def __init__(self, folder: Path, settings: dict[str, Any]):
        self.folder, self.settings = folder, settings
        self.stamp_file = folder.parent / f"{folder.name}.stage.json"

    def done(self, result: Path) -> bool:
        if not result.exists() or not self.stamp_file.is_file():
            return False
        return json.loads(self.stamp_file.read_text()).get("stamp") == _stamp(self.settings)

    def start(self) -> None:
        """Forget a result made with other settings; keep checkpoints of the same settings (a
        stopped run resumes from its last one)."""
        stamp = json.loads(self.stamp_file.read_text()) if self.stamp_file.is_file() else {}
        if stamp and stamp.get("stamp") != _stamp(self.settings):
            shutil.rmtree(self.folder, ignore_errors=True)
        with atomic_file(self.stamp_file) as tmp:
            tmp.write_text(
                json.dumps({"stamp": _stamp(self.settings), **self.settings}, default=str)
            )


def demo_objectives(config: DemoConfig, data: Path) -> dict[str, str]:
    """Objective → scorer for the demo's dataset: the config's, checked against the dataset's
    objectives, or the shipped ones when the dataset has exactly those."""
    from align.data import load_preference_data, objectives_of
    from align.scorers.base import SCORERS

    found = objectives_of(load_preference_data(str(data)))
    chosen = dict(config.objectives) if config.objectives else None
    if chosen is None:
        if set(found) != set(SHIPPED_OBJECTIVES):
            raise ValueError(
                f"the dataset {str(data)!r} has objectives {list(found)}: name the scorer of each "
                f"(align demo --objective NAME=SCORER ...; scorers: {', '.join(SCORERS.names())})"
            )
        chosen = {name: SHIPPED_OBJECTIVES[name] for name in found}
    missing = [name for name in chosen if name not in found]
    if missing:
        raise ValueError(
            f"objectives {missing} are not in the dataset {str(data)!r} ({list(found)})"
        )
    if len(chosen) < 2:
        raise ValueError(f"the demo trades off two or more objectives, got {list(chosen)}")
    for scorer in chosen.values():
        SCORERS.get(str(scorer).partition(":")[0])  # an unknown scorer fails before training
    return chosen


def train_stage(
    config: DemoConfig, recipe: str, output: Path, data: Path, extra: list[str]
) -> Path:
    """Train one recipe of the demo into ``output`` (``output/final``), or reuse the result of
    a run with the same settings."""
    from align.train import load_recipe, run_recipe

    overrides = [
        f"data.path={data}",
        f"args.output_dir={output}",
        f"args.seed={config.seed}",
        *extra,
        *config.overrides,
    ]
    recipe_dict = load_recipe(config.recipes_dir() / recipe, overrides)
    recipe_dict["model"] = config.model
    stage = Stage(output, training_identity(recipe_dict))
    final = output / "final"
    if stage.done(final):
        return final
    stage.start()
    return run_recipe(recipe_dict)


def training_identity(recipe: dict[str, Any]) -> dict[str, Any]:
    """What a checked recipe trains, without where: the model and the data by content, the
    output folder left out. A moved or copied run folder, or a second clone, is reused; an
    edited setting or dataset trains again (comments of the recipe file do not count)."""
    from align.sweep.routes import source_digest
    from align.train import resolve_recipe_path

    identity = json.loads(json.dumps(recipe, default=str))
    recipe_dir = identity.pop("_dir", ".")
    identity["args"].pop("output_dir", None)
    identity["model"] = source_digest(str(recipe["model"]))
    data = identity["data"]
    if "path" in data:
        data["path"] = source_digest(resolve_recipe_path(data["path"], recipe_dir))
    for name, path in data.get("sources", {}).items():
        data["sources"][name] = source_digest(resolve_recipe_path(path, recipe_dir))
    return identity


def run_demo(config: DemoConfig, log: Any = print) -> dict[str, Any]:
    """Run (or reuse) every stage; returns the report (also written to ``<output>/report``)."""
    from align.sweep import SweepConfig, run_sweep

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every process would train, stamp and write the same stage folders at once.
        raise ValueError(
            "align demo runs in one process; across processes run its stages one by one: "
            "accelerate launch ... -m align.train RECIPE, then -m align.evaluate CONFIG "
            "(recipes/evaluate/positive_brief.yaml is the demo's sweep)"
        )
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def timed(name: str, work):
        started = time.perf_counter()
        log(f"[align demo] {name} ...")
        result = work()
        timings[name] = time.perf_counter() - started
        log(f"[align demo] {name}: {timings[name]:.0f} s")
        return result

    data = timed("data", lambda: demo_dataset(config, out))
    objectives = demo_objectives(config, data)
    names = list(objectives)
    parm = timed(
        "train PARM",
        lambda: train_stage(
            config,
            "parm_cpu.yaml",
            out / "parm",
            data,
            [f"args.objectives=[{','.join(names)}]", f"args.max_steps={config.parm_steps}"],
        ),
    )
    arms = {}
    for objective in names:
        arms[objective] = timed(
            f"train ARM {objective}",
            lambda o=objective: train_stage(
                config,
                "genarm_cpu.yaml",
                out / f"arm-{o}",
                data,
                [f"args.objectives=[{o}]", f"args.max_steps={config.arm_steps}"],
            ),
        )
    routes: list[dict[str, Any]] = [
        {"name": "base", "kind": "base"},
        {"name": "PARM", "kind": "parm", "adapter": str(parm), "beta": config.beta},
        {
            "name": "GenARM",
            "kind": "genarm",
            "arms": {k: str(v) for k, v in arms.items()},
            "beta": config.beta,
        },
    ]
    if config.soup:
        soup = timed("merge soups", lambda: _soup(config, out, arms))
        routes.append({"name": "rewarded soup", "kind": "merged", "path": str(soup)})
    if config.with_dpo:
        policy = timed(
            "train DPO policy",
            lambda: train_stage(
                config, "dpo_cpu.yaml", out / "policy", data, [f"args.max_steps={config.dpo_steps}"]
            ),
        )
        routes.append({"name": "SVD-LoRA policy", "kind": "policy", "adapter": str(policy)})
    if config.with_rl:
        rewards = "{" + ", ".join(f"{name}: {scorer}" for name, scorer in objectives.items()) + "}"
        policy = timed(
            "train RL policy",
            lambda: train_stage(
                config,
                "mo_grpo_cpu.yaml",
                out / "rl-policy",
                data,  # its distinct prompts: the ones the offline routes trained on
                [f"args.rewards={rewards}", f"args.max_steps={config.rl_steps}"],
            ),
        )
        routes.append({"name": "MO-GRPO policy", "kind": "policy", "adapter": str(policy)})
    sweep = SweepConfig(
        base=config.model,
        objectives=names,
        scorers=dict(objectives),
        routes=routes,
        output=str(out / "report"),
        prompts={"offset": EVAL_PROMPT_OFFSET, "limit": config.eval_prompts},
        grid=config.grid,
        generation={
            "max_new_tokens": config.max_new_tokens,
            "batch_size": config.batch_size,
            "do_sample": False,
        },
        title=f"align demo: {' vs '.join(names)} on {config.model}",
    )
    from align.sweep import write_report

    report = timed("sweep", lambda: run_sweep(sweep, write=False))
    report["timings"] = {**timings}
    report["demo_config"] = asdict(config)
    write_report(report, out / "report")
    return report


def demo_dataset(config: DemoConfig, out: Path) -> Path:
    """The demo's preference dataset: the config's, the shipped one, or one built here."""
    if config.data:
        path = Path(config.data)
        if not path.is_file():
            raise FileNotFoundError(f"no dataset at {path}")
        return path.resolve()
    shipped = shipped_dataset()
    if shipped.is_file() and config.model == "smollm2-135m-instruct":
        return shipped
    # Another model (or an installation without its package data): make the dataset from this
    # model's own answers.
    from align.demo.dataset import build_demo_dataset, write_demo_dataset

    path = out / "data" / "positive_brief.jsonl"
    settings = {
        "model": config.model,
        "prompts": config.data_prompts,
        "max_new_tokens": config.max_new_tokens,
        "seed": config.seed,
    }
    stage = Stage(path.parent, settings)
    if not stage.done(path):
        stage.start()
        dataset, facts = build_demo_dataset(
            config.model,
            num_prompts=min(config.data_prompts, EVAL_PROMPT_OFFSET),
            max_new_tokens=config.max_new_tokens,
            seed=config.seed,
        )
        write_demo_dataset(dataset, facts, path)
    return path.resolve()


def _soup(config: DemoConfig, out: Path, arms: dict[str, Path]) -> Path:
    from align.io import content_digest
    from align.merging.lora import merge_lora_adapters

    folder = out / "soup"
    # Keyed by what the ARMs contain, not where they are: a retrained ARM makes a new soup.
    digests = {k: content_digest(v) for k, v in arms.items()}
    stage = Stage(
        folder,
        {"content": digests, "grid": config.grid},
    )
    if stage.done(folder):
        return folder
    stage.start()
    merge_lora_adapters(
        {k: str(v) for k, v in arms.items()},
        folder,
        sweep=config.grid,
        overwrite=True,
    )
    return folder
