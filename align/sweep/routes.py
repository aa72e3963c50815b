"""Routes: the ways a preference α reaches the text (one class per way, one registry).

A route answers prompts at a preference α. Every route shares one frozen base model where it
needs one (adapters are attached to it in place, so a sweep holds the base's weights once):

* ``base``     — the untuned model, α ignored (one point: what every front should beat);
* ``parm``     — the base guided by one PARM (α injected into its PBLoRA);
* ``genarm``   — the base guided by one ARM per objective, weighted α_i / β;
* ``mod``      — MOD: one policy per objective, mixed with weights α (log-probs linearly, or by
  the closed form of another f-divergence with the base as the reference policy);
* ``policy``   — a policy with a preference adapter (SVD-LoRA / PBLoRA), α set on the adapter;
* ``merged``   — one checkpoint (or LoRA adapter) per α, e.g. an ``align merge`` sweep
  (rewarded soups): each α is answered by the checkpoint merged for it.

A route's work is a list of :class:`Pass` es — batches of (α, prompt) rows decoded together —
fixed by its settings alone. One process decodes them all; under ``accelerate launch`` each
process decodes a slice of them (:func:`align.sweep.run.run_sweep`), every row in the very batch
one process would have put it in, so the answers do not depend on the number of processes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from align.files import read_json
from align.merging.checkpoint_io import MERGE_INFO
from align.preference import Preference
from align.registry import Registry

ROUTES: Registry = Registry("route kind", attribute="kind")


@dataclass(frozen=True)
class Pass:
    """One batch of a route's answers: the α rows ``alpha_start:alpha_stop`` of its grid for the
    prompts ``prompt_start:prompt_stop``, decoded together (answers
    ``[k - alpha_start][i - prompt_start]``)."""

    alpha_start: int
    alpha_stop: int
    prompt_start: int
    prompt_stop: int

    @property
    def rows(self) -> int:
        return (self.alpha_stop - self.alpha_start) * (self.prompt_stop - self.prompt_start)


def batched_passes(prompts: int, alphas: int, batch_size: int, alphas_per_pass: int) -> list[Pass]:
    """``alphas_per_pass`` α × ``batch_size`` prompts per pass, α-blocks outermost."""
    if batch_size < 1 or alphas_per_pass < 1:
        raise ValueError(
            f"batch_size and alphas_per_pass must be >= 1, got {batch_size}, {alphas_per_pass}"
        )
    return [
        Pass(
            alpha_start,
            min(alpha_start + alphas_per_pass, alphas),
            prompt_start,
            min(prompt_start + batch_size, prompts),
        )
        for alpha_start in range(0, alphas, alphas_per_pass)
        for prompt_start in range(0, prompts, batch_size)
    ]


def assemble(
    passes: Sequence[Pass], results: Sequence[list[list[str]]], alphas: int, prompts: int
) -> list[list[str]]:
    """``answers[k][i]`` from the answers of passes that cover every (α, prompt) once."""
    answers: list[list[str | None]] = [[None] * prompts for _ in range(alphas)]
    for one, rows in zip(passes, results, strict=True):
        for k, texts in zip(range(one.alpha_start, one.alpha_stop), rows, strict=True):
            answers[k][one.prompt_start : one.prompt_stop] = texts
    missing = sum(text is None for row in answers for text in row)
    if missing:
        raise ValueError(f"{missing} (α, prompt) answers are missing from the passes")
    return answers  # type: ignore[return-value]


def register_route(kind: str, *aliases: str):
    """Class decorator: make a route available as ``kind:`` in sweep configs."""
    return ROUTES.register(kind, *aliases)


class Route(ABC):
    """Answers prompts at one α. ``alphas`` is the grid it is swept over (None: one point)."""

    kind = "route"
    #: False for routes whose output does not depend on α (the base).
    uses_preference = True

    def __init__(self, name: str, objectives: Sequence[str], generation: Mapping[str, Any]):
        self.name = name
        self.objectives = tuple(objectives)
        self.generation = dict(generation)

    def alphas(self, grid: np.ndarray) -> np.ndarray:
        """The α values this route is evaluated at, (K, m)."""
        return grid

    @abstractmethod
    def answer(
        self, runtime: Runtime, prompts: list[str], alpha: np.ndarray, offset: int = 0
    ) -> list[str]:
        """Answers at one α. ``offset``: where ``prompts`` start in the sweep's prompts (a
        sampled batch's seed follows its place, so it is the same whichever pass decodes it)."""

    def passes(self, base: str, prompts: int, alphas: int) -> list[Pass]:
        """The batches this route answers in: by default one α and ``batch_size`` prompts."""
        return batched_passes(prompts, alphas, self.generation.get("batch_size", 16), 1)

    def answer_passes(
        self,
        runtime: Runtime,
        prompts: list[str],
        alphas: np.ndarray,
        passes: Sequence[Pass],
        progress: Any = None,
    ) -> list[list[list[str]]]:
        """The answers of ``passes`` (of the whole sweep's ``prompts`` and ``alphas``), one
        ``[k - alpha_start][i - prompt_start]`` list per pass."""
        results = []
        for one in passes:
            chunk = prompts[one.prompt_start : one.prompt_stop]
            results.append(
                [
                    self.answer(runtime, chunk, alphas[k], one.prompt_start)
                    for k in range(one.alpha_start, one.alpha_stop)
                ]
            )
            if progress is not None:
                progress.update(1)
        return results

    def answer_all(
        self, runtime: Runtime, prompts: list[str], alphas: np.ndarray, progress: Any = None
    ) -> list[list[str]]:
        """Answers at every α, ``[k][i]``: every pass, in one process."""
        passes = self.passes(runtime.base_name, len(prompts), len(alphas))
        results = self.answer_passes(runtime, prompts, alphas, passes, progress)
        return assemble(passes, results, len(alphas), len(prompts))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def sources(self) -> list[str]:
        """The adapter / checkpoint folders this route's answers are computed from."""
        return []

    def fingerprint(self) -> dict[str, Any]:
        """What determines this route's answers: its settings, with every folder it reads by
        *content* in place of its path (an adapter retrained at the same path has a new
        fingerprint; a run folder moved or copied elsewhere keeps its own)."""
        digests = {source: source_digest(source) for source in self.sources()}

        def by_content(value: Any) -> Any:
            if isinstance(value, str):
                return digests.get(value, value)
            if isinstance(value, Mapping):
                return {key: by_content(item) for key, item in value.items()}
            if isinstance(value, (list, tuple)):
                return [by_content(item) for item in value]
            return value

        return by_content(self.describe())

    def close(self) -> None:
        """Take off what this route attached to the shared base (the next route needs it bare)."""
        return None

    def per_row_guidance(self, runtime: Runtime) -> Any:
        """The :class:`~align.decoding.guided.Guidance` that decodes this route at any per-row
        α, step by step (what ``align serve`` runs); routes answering a fixed set of α have
        none."""
        raise ValueError(
            f"route {self.name!r} ({self.kind}) cannot decode an arbitrary α per request; "
            f"a served route is one of parm, genarm, mod, policy"
        )


def source_digest(reference: str) -> str:
    """The content digest of a local file or folder; a hub id or embedded model name stands for
    itself."""
    from align.io import content_digest

    path = Path(reference).expanduser()
    return content_digest(path) if path.exists() else reference


def _detach(model: Any) -> None:
    if model is not None and hasattr(model, "unload"):
        model.unload()  # PEFT: remove the injected adapter layers, base weights untouched


class Runtime:
    """What routes share during one sweep: the base model, its tokenizer, and the loading of
    adapters and checkpoints onto it."""

    def __init__(self, base: str, device: str | None = None, dtype: str = "float32"):
        from align.models import load_model

        self.base_name = base
        self.load_options = {"device": device, "dtype": dtype}
        self.model, self.tokenizer = load_model(base, **self.load_options)
        self.model.eval()

    def load_model(self, reference: str, shared: bool = True) -> Any:
        """``(model, tokenizer)`` of an adapter folder or checkpoint; an adapter on the base is
        attached to the shared base (``shared``) or to a copy of its own."""
        from align.decoding.loading import load_guide

        base_model = self.model if shared else None
        return load_guide(reference, self.base_name, base_model=base_model, **self.load_options)

    def plain(
        self, model: Any, prompts: list[str], generation: Mapping[str, Any], offset: int = 0
    ) -> list[str]:
        """``model.generate`` on batches of ``batch_size``; batch j of a sampled run is seeded
        ``seed + offset + j · batch_size`` (its first prompt's place in the sweep)."""
        from align.decoding.plain import generate_responses

        options = dict(generation)
        size = options.get("batch_size", 16)
        seed = options.get("seed")
        answers: list[str] = []
        for start in range(0, len(prompts), size):
            answers += generate_responses(
                model,
                self.tokenizer,
                prompts[start : start + size],
                max_new_tokens=options.get("max_new_tokens", 48),
                batch_size=size,
                do_sample=options.get("do_sample", False),
                temperature=options.get("temperature", 1.0),
                top_p=options.get("top_p", 1.0),
                seed=None if seed is None else seed + offset + start,
                show_progress=False,
            )
        return answers

    def guided_passes(
        self,
        guidance: Any,
        prompts: list[str],
        alphas: np.ndarray,
        passes: Sequence[Pass],
        generation: Mapping[str, Any],
        progress: Any = None,
    ) -> list[list[list[str]]]:
        """Each pass's α block × prompt batch in one decoding pass, the prompts read once per
        pass by the models whose scores do not depend on α; a sampled pass is seeded by its
        place in the sweep."""
        from align.decoding import guided_sweep

        options = dict(generation)
        seed = options.get("seed")
        results = []
        for one in passes:
            results.append(
                guided_sweep(
                    self.model if guidance.needs_base else None,
                    self.tokenizer,
                    prompts[one.prompt_start : one.prompt_stop],
                    guidance,
                    alphas[one.alpha_start : one.alpha_stop].tolist(),
                    max_new_tokens=options.get("max_new_tokens", 48),
                    do_sample=options.get("do_sample", False),
                    temperature=options.get("temperature", 1.0),
                    top_p=options.get("top_p"),
                    seed=None
                    if seed is None
                    else seed + one.alpha_start * len(prompts) + one.prompt_start,
                )
            )
            if progress is not None:
                progress.update(1)
        return results

    def guided_sweep(
        self, guidance: Any, prompts: list[str], alphas: np.ndarray, generation, progress=None
    ) -> list[list[str]]:
        """Every α of ``alphas`` for every prompt: ``alphas_per_pass`` α (default: all) and
        ``batch_size`` prompts decode together (:func:`guided_route_passes`)."""
        passes = guided_route_passes(generation, len(prompts), len(alphas))
        results = self.guided_passes(guidance, prompts, alphas, passes, generation, progress)
        return assemble(passes, results, len(alphas), len(prompts))

    def guided_answers(
        self, guidance: Any, prompts: list[str], alpha: np.ndarray, generation
    ) -> list[str]:
        """Answers at one α: :meth:`guided_sweep` of a one-row grid."""
        return self.guided_sweep(guidance, prompts, np.asarray(alpha)[None], generation)[0]


def guided_route_passes(generation: Mapping[str, Any], prompts: int, alphas: int) -> list[Pass]:
    """A one-pass route's batches: ``alphas_per_pass`` α (default: all) × ``batch_size``
    prompts."""
    return batched_passes(
        prompts,
        alphas,
        generation.get("batch_size", 16),
        generation.get("alphas_per_pass") or alphas,
    )


@register_route("base")
class BaseRoute(Route):
    """The untuned base model: one point, whatever α asks."""

    uses_preference = False

    def alphas(self, grid: np.ndarray) -> np.ndarray:
        return np.full((1, grid.shape[1]), 1.0 / grid.shape[1])

    def answer(
        self, runtime: Runtime, prompts: list[str], alpha: np.ndarray, offset=0
    ) -> list[str]:
        return runtime.plain(runtime.model, prompts, self.generation, offset)


class GuidedRoute(Route):
    """A frozen base guided at decoding time; subclasses build the :class:`Guidance` once."""

    _guidance: Any = None

    @abstractmethod
    def _build(self, runtime: Runtime) -> Any: ...

    def _cached_guidance(self, runtime: Runtime) -> Any:
        if self._guidance is None:
            self._guidance = self._build(runtime)
        return self._guidance

    def answer(
        self, runtime: Runtime, prompts: list[str], alpha: np.ndarray, offset=0
    ) -> list[str]:
        return runtime.guided_answers(
            self._cached_guidance(runtime), prompts, alpha, self.generation
        )

    def per_row_guidance(self, runtime: Runtime) -> Any:
        return self._cached_guidance(runtime)

    def passes(self, base: str, prompts: int, alphas: int) -> list[Pass]:
        return guided_route_passes(self.generation, prompts, alphas)

    def answer_passes(self, runtime, prompts, alphas, passes, progress=None):
        return runtime.guided_passes(
            self._cached_guidance(runtime), prompts, alphas, passes, self.generation, progress
        )

    def close(self) -> None:
        self._guidance = None


@register_route("parm")
class PARMRoute(GuidedRoute):
    """The base guided by one PARM adapter folder."""

    def __init__(self, name, objectives, generation, adapter: str, beta: float = 1.0):
        super().__init__(name, objectives, generation)
        self.adapter, self.beta = str(adapter), float(beta)

    def _build(self, runtime: Runtime) -> Any:
        from align.decoding import parm_guidance
        from align.preference import require_same_objectives

        model, tokenizer = runtime.load_model(self.adapter)
        guidance = parm_guidance(model, self.beta, tokenizer=tokenizer)
        require_same_objectives(
            guidance.objectives, self.objectives, f"PARM {self.adapter}", "the sweep"
        )
        return guidance

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "adapter": self.adapter, "beta": self.beta}

    def sources(self) -> list[str]:
        return [self.adapter]

    def close(self) -> None:
        if self._guidance is not None:
            _detach(self._guidance.models[0])  # the PARM sits on the shared base: take it off
        super().close()


@register_route("genarm")
class GenARMRoute(GuidedRoute):
    """The base guided by one ARM per objective (``arms: {objective: folder}``)."""

    def __init__(self, name, objectives, generation, arms: Mapping[str, str], beta: float = 1.0):
        super().__init__(name, objectives, generation)
        self.arms = _per_objective(arms, self.objectives, name, "arms")
        self.beta = float(beta)

    def _build(self, runtime: Runtime) -> Any:
        from align.decoding import genarm_guidance

        # One model per ARM: two adapters cannot both be injected into the shared base.
        loaded = {k: runtime.load_model(path, shared=False) for k, path in self.arms.items()}
        return genarm_guidance(
            {k: model for k, (model, _) in loaded.items()},
            self.beta,
            [tok for _, tok in loaded.values()],
        )

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "arms": self.arms, "beta": self.beta}

    def sources(self) -> list[str]:
        return list(self.arms.values())


@register_route("mod")
class MODRoute(GuidedRoute):
    """MOD: one policy per objective (``policies: {objective: folder}``), mixed by α under
    ``divergence`` (``reverse_kl``: log-probs mixed linearly; ``forward_kl``,
    ``jensen_shannon``, ``alpha`` with its order ``divergence_alpha``: the closed form of that
    f-divergence, the sweep's base as the reference policy).

    ``arms:`` is accepted for ``policies:`` (what configs named the field before; it holds the
    same folders)."""

    def __init__(
        self,
        name,
        objectives,
        generation,
        policies: Mapping[str, str] | None = None,
        divergence: str = "reverse_kl",
        divergence_alpha: float | None = None,
        arms: Mapping[str, str] | None = None,
    ):
        from align.decoding.divergences import check_divergence

        super().__init__(name, objectives, generation)
        if policies is not None and arms is not None:
            raise ValueError(
                f"route {name!r}: give `policies` or `arms` (its other name), not both"
            )
        if policies is None and arms is None:
            raise ValueError(f"route {name!r}: give `policies`: one policy folder per objective")
        field = "policies" if policies is not None else "arms"
        self.policies = _per_objective(
            policies if policies is not None else arms, self.objectives, name, field
        )
        try:
            self.divergence_alpha = check_divergence(divergence, divergence_alpha)
        except ValueError as error:
            raise ValueError(f"route {name!r}: {error}") from None
        self.divergence = divergence

    def _build(self, runtime: Runtime) -> Any:
        from align.decoding import mod_guidance

        # Each policy needs its own weights: MOD mixes full models, no shared base.
        loaded = {k: runtime.load_model(path, shared=False) for k, path in self.policies.items()}
        return mod_guidance(
            {k: model for k, (model, _) in loaded.items()},
            [tok for _, tok in loaded.values()],
            divergence=self.divergence,
            divergence_alpha=self.divergence_alpha,
        )

    def describe(self) -> dict[str, Any]:
        described = {"kind": self.kind, "policies": self.policies, "divergence": self.divergence}
        if self.divergence_alpha is not None:
            described["divergence_alpha"] = self.divergence_alpha
        return described

    def fingerprint(self) -> dict[str, Any]:
        # Under the key earlier versions wrote: cached MOD answers stay valid (same folders).
        return {
            ("arms" if key == "policies" else key): value
            for key, value in super().fingerprint().items()
        }

    def sources(self) -> list[str]:
        return list(self.policies.values())


@register_route("policy")
class PolicyRoute(Route):
    """A policy with a preference adapter (SVD-LoRA / PBLoRA): α set on it, then plain decoding."""

    def __init__(self, name, objectives, generation, adapter: str):
        super().__init__(name, objectives, generation)
        self.adapter = str(adapter)
        self._model = None

    def _policy(self, runtime: Runtime) -> Any:
        from align.adapters import objectives_of
        from align.preference import require_same_objectives

        if self._model is None:
            self._model, _ = runtime.load_model(self.adapter)
            require_same_objectives(
                objectives_of(self._model), self.objectives, f"policy {self.adapter}", "the sweep"
            )
        return self._model

    def answer(
        self, runtime: Runtime, prompts: list[str], alpha: np.ndarray, offset=0
    ) -> list[str]:
        from align.adapters import set_preference

        model = self._policy(runtime)
        set_preference(model, Preference(torch.as_tensor(alpha), self.objectives))
        return runtime.plain(model, prompts, self.generation, offset)

    def per_row_guidance(self, runtime: Runtime) -> Any:
        """The policy decoding alone, α injected per row."""
        from align.decoding import policy_guidance

        return policy_guidance(self._policy(runtime))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "adapter": self.adapter}

    def sources(self) -> list[str]:
        return [self.adapter]

    def close(self) -> None:
        _detach(self._model)
        self._model = None


@register_route("merged")
class MergedRoute(Route):
    """One checkpoint or adapter per α: a folder written by ``align merge`` with a sweep (each
    subfolder records its α in ``align_merge.json``), or ``checkpoints: [folder, ...]`` — merged
    checkpoints, or policies trained at one fixed α (``mo_grpo`` with ``preference:``: their
    ``align_training.json`` records it)."""

    def __init__(self, name, objectives, generation, path: str | None = None, checkpoints=None):
        super().__init__(name, objectives, generation)
        if (path is None) == (checkpoints is None):
            raise ValueError(f"route {name!r}: give `path` (a merge sweep) or `checkpoints`")
        folders = (
            sorted(p for p in Path(path).iterdir() if (p / MERGE_INFO).is_file())
            if path is not None and Path(path).is_dir()
            else [Path(p) for p in (checkpoints or [])]
        )
        if not folders:
            raise ValueError(f"route {name!r}: no merged checkpoints ({MERGE_INFO}) in {path}")
        self.by_alpha: dict[tuple[float, ...], str] = {}
        for folder in folders:
            preference = self._recorded_preference(name, folder)
            key = tuple(round(float(w), 6) for w in preference.weights.tolist())
            self.by_alpha[key] = str(folder)

    def _recorded_preference(self, name: str, folder: Path) -> Preference:
        from align.rewards.arm import TRAINING_INFO

        info_file, trained = folder / MERGE_INFO, folder / TRAINING_INFO
        if info_file.is_file():
            preference = read_json(info_file)["preference"]
        elif trained.is_file() and read_json(trained).get("preference"):
            preference = read_json(trained)["preference"]
        else:
            raise ValueError(
                f"route {name!r}: {folder} has no {MERGE_INFO} and no fixed α in {TRAINING_INFO}"
            )
        return Preference.from_dict(preference, self.objectives)

    def alphas(self, grid: np.ndarray) -> np.ndarray:
        return np.array(sorted(self.by_alpha), dtype=np.float64)

    def answer(
        self, runtime: Runtime, prompts: list[str], alpha: np.ndarray, offset=0
    ) -> list[str]:
        model, _ = runtime.load_model(self._folder(alpha))
        try:
            return runtime.plain(model, prompts, self.generation, offset)
        finally:
            _detach(model)

    def passes(self, base: str, prompts: int, alphas: int) -> list[Pass]:
        """A sweep of exact LoRA interpolations whose inputs are unchanged decodes
        ``alphas_per_pass`` α (default: all) per pass (see :meth:`answer_passes`); any other
        merge: one α per pass."""
        if self.interpolated_sources(base) is None:
            return super().passes(base, prompts, alphas)
        return guided_route_passes(self.generation, prompts, alphas)

    def answer_passes(self, runtime, prompts, alphas, passes, progress=None):
        """A sweep of exact LoRA interpolations (``align merge`` of LoRA adapters, output
        ``adapter``) whose inputs still hold what was merged decodes several α in one batch: the
        input adapters sit on the shared base together and each row weights adapter k's update
        by its own α_k — Σ_k α_k ΔW_k, the merged adapter's update, with the weights read once
        per step instead of once per α. Any other merge: each α's checkpoint, loaded once for
        the consecutive passes that use it."""
        sources = self.interpolated_sources(runtime.base_name)
        if sources is None:
            return self._answer_each(runtime, prompts, alphas, passes, progress)
        from align.decoding import guided_generate, lora_soup

        options = dict(self.generation)
        seed = options.get("seed")
        results = []
        # The base, its rows weighting the input adapters, decoded greedily (or sampled) by
        # align's decoder: its KV cache, and finished rows leaving the batch (their weights
        # with them); `generate` would decode every row to the longest answer.
        with lora_soup(runtime.model, sources) as guidance:
            for one in passes:
                block = np.asarray(alphas[one.alpha_start : one.alpha_stop])
                chunk = prompts[one.prompt_start : one.prompt_stop]
                rows = torch.as_tensor(block).repeat_interleave(len(chunk), dim=0)
                texts = guided_generate(
                    None,
                    runtime.tokenizer,
                    [prompt for _ in block for prompt in chunk],
                    guidance,
                    Preference(rows, guidance.objectives),
                    max_new_tokens=options.get("max_new_tokens", 48),
                    do_sample=options.get("do_sample", False),
                    temperature=options.get("temperature", 1.0),
                    top_p=options.get("top_p"),
                    seed=None
                    if seed is None
                    else seed + one.alpha_start * len(prompts) + one.prompt_start,
                )
                results.append(
                    [texts[k * len(chunk) : (k + 1) * len(chunk)] for k in range(len(block))]
                )
                if progress is not None:
                    progress.update(1)
        return results

    def _answer_each(self, runtime, prompts, alphas, passes, progress):
        results, folder, model = [], None, None
        try:
            for one in passes:
                rows = []
                for k in range(one.alpha_start, one.alpha_stop):
                    if self._folder(alphas[k]) != folder:
                        _detach(model)
                        model, folder = None, self._folder(alphas[k])
                        model, _ = runtime.load_model(folder)
                    chunk = prompts[one.prompt_start : one.prompt_stop]
                    rows.append(runtime.plain(model, chunk, self.generation, one.prompt_start))
                results.append(rows)
                if progress is not None:
                    progress.update(1)
        finally:
            _detach(model)
        return results

    def interpolated_sources(self, base: str) -> dict[str, str] | None:
        """The input adapters, in objective order, when every α's folder is their exact LoRA
        interpolation and they are unchanged since (content digests); else None."""
        if not all((Path(f) / MERGE_INFO).is_file() for f in self.sources()):
            return None  # policies trained per α: nothing to interpolate
        records = [read_json(Path(f) / MERGE_INFO) for f in self.sources()]
        first = records[0]
        models = first.get("models") or {}
        if set(models) != set(self.objectives) or any(
            r.get("merge_method") != "lora"
            or r.get("parameters", {}).get("output") != "adapter"
            or r.get("parameters", {}).get("dtype") is not None
            or r.get("models") != models
            or r.get("model_digests") != first.get("model_digests")
            for r in records
        ):
            return None
        digests = first.get("model_digests") or {}
        for objective, folder in models.items():
            if not _is_lora_of(folder, base) or digests.get(objective) != source_digest(folder):
                return None
        return {objective: models[objective] for objective in self.objectives}

    def _folder(self, alpha: np.ndarray) -> str:
        return self.by_alpha[tuple(round(float(w), 6) for w in np.asarray(alpha).tolist())]

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "checkpoints": self.by_alpha_json()}

    def sources(self) -> list[str]:
        return list(self.by_alpha.values())

    def by_alpha_json(self) -> dict[str, str]:
        return {",".join(f"{w:g}" for w in k): v for k, v in self.by_alpha.items()}


def _is_lora_of(folder: str, base: str) -> bool:
    """Whether ``folder`` holds a PEFT LoRA adapter trained on ``base``."""
    from align.models import resolve_model_path

    config_file = Path(folder) / "adapter_config.json"
    if not config_file.is_file():
        return False
    config = read_json(config_file)
    named = config.get("base_model_name_or_path")
    return (
        config.get("peft_type") == "LORA"
        and not config.get("modules_to_save")  # full-weight copies: not a weighted update
        and not config.get("use_dora")
        and (named is None or resolve_model_path(named) == resolve_model_path(base))
    )


def _per_objective(mapping: Any, objectives: tuple[str, ...], route: str, field: str) -> dict:
    if not isinstance(mapping, Mapping) or set(mapping) != set(objectives):
        found = sorted(mapping) if isinstance(mapping, Mapping) else mapping
        raise ValueError(
            f"route {route!r}: `{field}` must map each objective {list(objectives)} to a folder, "
            f"got {found}"
        )
    return {objective: str(mapping[objective]) for objective in objectives}


def build_route(spec: Mapping[str, Any], objectives: Sequence[str], generation: Mapping) -> Route:
    """A route from its config entry: ``{name: ..., kind: parm, adapter: ..., beta: ...}``."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    name = spec.pop("name", kind)
    try:
        route_class = ROUTES.get(kind)
    except ValueError as error:
        raise ValueError(f"route {name!r}: {error}") from error
    options = {**generation, **spec.pop("generation", {})}
    try:
        return route_class(name, objectives, options, **spec)
    except TypeError as error:
        raise ValueError(f"route {name!r} ({kind}): bad fields {sorted(spec)}: {error}") from error
