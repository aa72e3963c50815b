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
from align.sweep.routes import Route, Runtime, build_route


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
        lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        texts = [json.loads(line)["prompt"] for line in lines] if file.suffix == ".jsonl" else lines
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
    unless ``write=False`` (a caller that adds to the report writes it once itself)."""
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
    output = Path(config.output)
    cache_dir = output.parent / f"{output.name}.generations"
    from align.models import load_tokenizer

    # Scorers first: a missing score range is an error before any answer is generated.
    scorers = build_scorers(
        config.scorers, load_tokenizer(config.base), config.generation.get("max_new_tokens", 48)
    )
    bounds = scorer_bounds(scorers, objectives)
    from align.sweep.routes import source_digest

    base_identity = [config.base, source_digest(config.base)]
    runtime = None
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for route in routes:
        alphas = route.alphas(grid)
        key = _cache_key(route, prompts, alphas, base_identity)
        cache = cache_dir / f"{route.name}.json"
        cached = json.loads(cache.read_text()) if cache.is_file() else {}
        route_started = time.perf_counter()
        reused = cached.get("key") == key
        if reused:
            answers = cached["answers"]
        else:
            if runtime is None:
                runtime = Runtime(config.base, device=config.device, dtype=config.dtype)
            progress = tqdm(
                total=len(alphas), desc=f"sweep {route.name}", unit="α", disable=not show_progress
            )
            try:
                answers = route.answer_all(runtime, prompts, alphas, progress)
            finally:
                progress.close()
                route.close()
            with atomic_file(cache) as tmp:
                tmp.write_text(json.dumps({"key": key, "answers": answers}))
        timings[f"generate {route.name}"] = time.perf_counter() - route_started
        scores = np.array(
            [[scorers[o].score(prompts, texts) for o in objectives] for texts in answers]
        )  # (K, m, N)
        results[route.name] = {
            **route.describe(),
            "uses_preference": route.uses_preference,
            "alphas": alphas.tolist(),
            "means": scores.mean(axis=2).tolist(),
            "stderr": (scores.std(axis=2, ddof=1) / np.sqrt(len(prompts))).tolist()
            if len(prompts) > 1
            else None,
            "examples": [texts[0] for texts in answers],
            "generations": "reused" if reused else "generated",
        }
    report = {
        "title": config.title,
        "base": config.base,
        "objectives": objectives,
        "scorers": {o: _scorer_name(s) for o, s in config.scorers.items()},
        "num_prompts": len(prompts),
        "generation": config.generation,
        "routes": results,
        "metrics": route_metrics(results, objectives, bounds),
        "timings": {**timings, "total": time.perf_counter() - started},
    }
    if write:
        write_report(report, output)
    return report


def _scorer_name(entry: Any) -> str:
    return entry["name"] if isinstance(entry, Mapping) else str(entry)
