"""An α sweep: every route answers the same prompts at every α of the grid, every answer is
scored on every objective, and the mean scores per α make each route's front.

Generations are cached per route in ``<output>.generations/<route>.json`` under a key of
everything that determines them — the route's settings, the *content* of every adapter or
checkpoint it reads (not its path: an adapter retrained in place is answered anew), the base,
prompts, α grid and decoding options — so a re-run only generates what changed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from align.io import atomic_file
from align.preference import check_objectives, simplex_grid
from align.sweep.report import route_metrics, write_report
from align.sweep.routes import Pass, Route, Runtime, assemble, build_route


@dataclass
class SweepConfig:
    """What ``align evaluate`` reads from YAML (see ``recipes/evaluate/``)."""

    base: str
    objectives: list[str]
    scorers: dict[str, Any]
    routes: list[dict[str, Any]]
    output: str
    prompts: dict[str, Any] = field(default_factory=lambda: {"limit": 24})
    grid: int = 10
    generation: dict[str, Any] = field(
        default_factory=lambda: {"max_new_tokens": 48, "batch_size": 16, "do_sample": False}
    )
    title: str = "α sweep"
    device: str | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        self.objectives = list(check_objectives(self.objectives))
        missing = [o for o in self.objectives if o not in self.scorers]
        if missing or set(self.scorers) - set(self.objectives):
            raise ValueError(
                f"`scorers` must name one scorer per objective {self.objectives}, "
                f"got {sorted(self.scorers)}"
            )
        if not self.routes:
            raise ValueError("`routes` is empty: name at least one route to sweep")
        if not isinstance(self.grid, int) or self.grid < 1:
            raise ValueError(
                f"`grid` is the number of divisions of the simplex (>= 1), got {self.grid}"
            )


def load_sweep_config(path: str | Path, overrides: Sequence[str] = ()) -> SweepConfig:
    """A :class:`SweepConfig` from YAML, with ``key.sub=value`` overrides."""
    from align.config import build_dataclass, read_config

    return build_dataclass(
        SweepConfig, read_config(path, "evaluation config", overrides), "evaluation config"
    )


def load_sweep_prompts(spec: Mapping[str, Any]) -> list[str]:
    """Prompts from ``{path: file.jsonl|.txt, limit: N}``, or the shipped held-out prompts."""
    from align.data import load_prompts
    from align.data.prompts import read_prompt_file

    spec = dict(spec)
    limit = spec.pop("limit", None)
    path = spec.pop("path", None)
    offset = int(spec.pop("offset", 0))
    if spec:
        raise ValueError(f"unknown prompts fields {sorted(spec)}; known: path, limit, offset")
    if path is None:
        texts = [record["prompt"] for record in load_prompts()]
    else:
        file = Path(path)
        if not file.is_file():
            raise ValueError(f"prompts file {path} does not exist")
        texts = read_prompt_file(file)
    texts = texts[offset:]
    return texts[:limit] if limit is not None else texts


def build_scorers(spec: Mapping[str, Any], tokenizer: Any, max_new_tokens: int) -> dict[str, Any]:
    """Objective → scorer; brevity counts the base's tokens against the generation budget.

    An entry may be a name or ``{name: ..., bounds: [low, high], <scorer options>}``; ``bounds``
    sets the score's range for the report's fixed scale (needed by scorers without a natural
    range, such as reward models)."""
    from align.scorers import get_scorer

    scorers = {}
    for objective, entry in spec.items():
        options = dict(entry) if isinstance(entry, Mapping) else {"name": entry}
        name = options.pop("name")
        bounds = options.pop("bounds", None)
        if name == "brevity":
            options.setdefault("tokenizer", tokenizer)
            options.setdefault("max_tokens", max_new_tokens)
        scorer = get_scorer(name, **options)
        if bounds is not None:
            scorer.bounds = _check_bounds(bounds, objective)
        scorers[objective] = scorer
    return scorers


def _check_bounds(bounds: Any, objective: str) -> tuple[float, float]:
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError(
            f"scorer of {objective!r}: bounds must be [low, high], got {bounds!r}"
        ) from None
    if not (np.isfinite([low, high]).all() and high > low):
        raise ValueError(f"scorer of {objective!r}: bounds need finite low < high, got {bounds!r}")
    return low, high


def scorer_bounds(scorers: Mapping[str, Any], objectives: Sequence[str]) -> list[list[float]]:
    """Each objective's (low, high) score range, from its scorer; an error names any without."""
    missing = [o for o in objectives if getattr(scorers[o], "bounds", None) is None]
    if missing:
        raise ValueError(
            f"the scorers of {missing} declare no score range; give each a `bounds: [low, high]` "
            "(e.g. `{name: reward-model, model: ..., bounds: [-10, 10]}`) so that hypervolume and "
            "MIP are measured on a fixed scale"
        )
    return [list(scorers[o].bounds) for o in objectives]


def _cache_key(route: Route, prompts: list[str], alphas: np.ndarray, base: list[str]) -> str:
    """``base``: the base's name and content digest (hashed once per sweep, not per route)."""
    blob = json.dumps(
        [
            route.fingerprint(),
            route.generation,
            base,
            prompts,
            np.round(alphas, 6).tolist(),
        ],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_sweep(
    config: SweepConfig, *, show_progress: bool = True, write: bool = True
) -> dict[str, Any]:
    """Generate, score and report; returns the report dict, also written to ``config.output``
    unless ``write=False`` (a caller that adds to the report writes it once itself).

    Under ``accelerate launch`` the (α, prompt) work is shared by the processes: every route's
    passes (its batches, fixed by its settings alone) are split into contiguous runs balanced
    by their rows, each process decodes its own, and rank 0 gathers them. Rank 0 alone reads
    and writes the generation caches, scores and writes the report; every process returns it.
    The answers — and so the report — are those of one process; only ``timings`` differ (a
    route's ``generate`` seconds are summed over the processes that decoded its passes)."""
    from align.distributed import current_shard

    shard = current_shard()
    started = time.perf_counter()
    objectives = config.objectives
    prompts = load_sweep_prompts(config.prompts)
    if not prompts:
        raise ValueError("the sweep has no prompts")
    routes = [build_route(spec, objectives, config.generation) for spec in config.routes]
    names = [route.name for route in routes]
    if len(set(names)) != len(names):
        raise ValueError(f"route names must be unique, got {names}")
    grid = simplex_grid(len(objectives), config.grid).numpy()
    alphas = [route.alphas(grid) for route in routes]
    output = Path(config.output)
    cache_dir = output.parent / f"{output.name}.generations"

    # Rank 0: scorers first (a missing score range is an error before any answer is
    # generated), then the caches: which routes to generate, in which passes.
    scorers: dict[str, Any] = {}
    bounds: list[list[float]] = []
    answers: dict[int, list[list[str]]] = {}
    keys: dict[int, str] = {}
    work: list[tuple[int, list[Pass]]] = []
    timings: dict[str, float] = {}
    error = None
    if shard.is_main:
        try:
            from align.models import load_tokenizer
            from align.sweep.routes import source_digest

            scorers = build_scorers(
                config.scorers,
                load_tokenizer(config.base),
                config.generation.get("max_new_tokens", 48),
            )
            bounds = scorer_bounds(scorers, objectives)
            base_identity = [config.base, source_digest(config.base)]
            for index, route in enumerate(routes):
                read_started = time.perf_counter()
                key = _cache_key(route, prompts, alphas[index], base_identity)
                cache = cache_dir / f"{route.name}.json"
                cached = json.loads(cache.read_text()) if cache.is_file() else {}
                if cached.get("key") == key:
                    answers[index] = cached["answers"]
                else:
                    keys[index] = key
                    work.append(
                        (index, route.passes(config.base, len(prompts), len(alphas[index])))
                    )
                timings[f"generate {route.name}"] = time.perf_counter() - read_started
        except Exception as caught:
            error = caught
    shard.check(error)
    work = shard.broadcast(work)

    # Every process: its share of the passes, route by route.
    items = [(index, one) for index, passes in work for one in passes]
    mine = set(shard.mine([one.rows for _, one in items]))
    shard.log_share("sweep", len(mine), len(items), "passes")
    done: list[tuple[int, list[list[str]]]] = []
    seconds: dict[int, float] = {}
    runtime = None
    error = None
    try:
        for index, _ in work:
            js = [j for j, (of, _) in enumerate(items) if of == index and j in mine]
            if not js:
                continue
            route = routes[index]
            route_started = time.perf_counter()
            if runtime is None:
                device = shard.device(config.device)
                runtime = Runtime(config.base, device=device, dtype=config.dtype)
            progress = tqdm(
                total=len(js),
                desc=f"sweep {route.name}",
                unit="pass",
                disable=not (show_progress and shard.is_main),
            )
            try:
                results = route.answer_passes(
                    runtime, prompts, alphas[index], [items[j][1] for j in js], progress
                )
            finally:
                progress.close()
                route.close()
            done += zip(js, results)
            seconds[index] = time.perf_counter() - route_started
    except Exception as caught:
        error = caught
    shard.check(error)
    gathered = shard.gather((done, seconds))

    report: dict[str, Any] | None = None
    error = None
    if shard.is_main:
        try:
            by_item = {j: result for part in gathered for j, result in part[0]}
            for index, passes in work:
                parts = [by_item[j] for j, (of, _) in enumerate(items) if of == index]
                answers[index] = assemble(passes, parts, len(alphas[index]), len(prompts))
                with atomic_file(cache_dir / f"{routes[index].name}.json") as tmp:
                    tmp.write_text(json.dumps({"key": keys[index], "answers": answers[index]}))
            report = _report(config, routes, alphas, prompts, answers, set(keys), scorers)
            report["metrics"] = route_metrics(report["routes"], objectives, bounds)
            for index, route in enumerate(routes):
                spent = sum(part[1].get(index, 0.0) for part in gathered)
                timings[f"generate {route.name}"] += spent
            report["timings"] = {**timings, "total": time.perf_counter() - started}
            if write:
                write_report(report, output)
        except Exception as caught:
            error = caught
    shard.check(error)
    return shard.broadcast(report)


def _report(config, routes, alphas, prompts, answers, generated, scorers) -> dict[str, Any]:
    """Every route's answers scored: the report without its metrics and timings."""
    objectives = config.objectives
    results: dict[str, Any] = {}
    for index, route in enumerate(routes):
        texts_per_alpha = answers[index]
        scores = np.array(
            [[scorers[o].score(prompts, texts) for o in objectives] for texts in texts_per_alpha]
        )  # (K, m, N)
        results[route.name] = {
            **route.describe(),
            "uses_preference": route.uses_preference,
            "alphas": alphas[index].tolist(),
            "means": scores.mean(axis=2).tolist(),
            "stderr": (scores.std(axis=2, ddof=1) / np.sqrt(len(prompts))).tolist()
            if len(prompts) > 1
            else None,
            "examples": [texts[0] for texts in texts_per_alpha],
            "generations": "generated" if index in generated else "reused",
        }
    return {
        "title": config.title,
        "base": config.base,
        "objectives": objectives,
        "scorers": {o: _scorer_name(s) for o, s in config.scorers.items()},
        "num_prompts": len(prompts),
        "generation": config.generation,
        "routes": results,
    }


def _scorer_name(entry: Any) -> str:
    return entry["name"] if isinstance(entry, Mapping) else str(entry)
