"""Rewards for online RL: one TRL reward function per objective, named after it.

TRL's ``GRPOTrainer`` calls each reward function as ``f(prompts, completions, **kwargs)`` and
logs it under its ``__name__`` (``rewards/<name>/mean``); :func:`objective_rewards` builds one
per objective from a spec:

* a scorer name (``positivity``, ``brevity``, ...) or ``reward-model:PATH`` — any
  :func:`align.scorers.get_scorer` spec;
* ``arm:PATH`` — an ARM adapter folder (GenARM): the response's summed token log-prob;
* ``parm:PATH`` — a PARM adapter folder scored at this objective's vertex α = e_i (the
  objective must be one of the PARM's). Objectives naming the same PARM share one model, and
  all their vertices are scored in one batched pass with one α per row;
* ``python:package.module:function`` — a function with TRL's reward signature, imported (a
  recipe's own reward), or any such callable passed directly;
* a mapping ``{name: <scorer>, <scorer options>}`` (e.g. ``{name: brevity, max_tokens: 48}``).

``brevity`` counts the policy's tokens against the completion budget (``max_new_tokens``), as
the sweep's reports do, unless its options say otherwise.

ARM and PARM rewards read each prompt once: the G completions of a GRPO group share it, so the
prompt runs through the model once and its KV cache is repeated for the group's rows (the same
scores as G full rows, :func:`prompt_shared_log_probs`).

A reward may return None for a completion it cannot score; TRL turns it into NaN, which every
mode of :class:`~align.trainers.grpo.MOGRPOTrainer` skips (``nansum`` / ``nanmean``), and a
completion with no reward at all gets advantage 0 — TRL's rule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from align.rewards.arm import reward_settings, tokenize_prompt, tokenize_response
from align.rewards.scoring import continuation_log_probs, fused_head, prompt_cache

RewardSpec = str | Callable[..., Sequence[float | None]]


def text_of(item: Any) -> str:
    """The text of a TRL prompt or completion: a string, or the last message's content."""
    if isinstance(item, str):
        return item
    if isinstance(item, list) and item and isinstance(item[-1], Mapping):
        content = item[-1].get("content", "")
        if isinstance(content, list):  # content blocks
            return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
        return str(content)
    raise TypeError(f"a prompt or completion must be text or a list of messages, got {item!r}")


class ObjectiveReward:
    """A TRL reward function for one objective (``__name__`` is the objective's name)."""

    def __init__(self, objective: str, score: Callable[[list[str], list[str]], Any], source: str):
        self.__name__ = objective
        self.objective = objective
        self.source = source
        self._score = score

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any):
        values = self._score([text_of(p) for p in prompts], [text_of(c) for c in completions])
        return [None if v is None else float(v) for v in values]

    def __repr__(self) -> str:
        return f"ObjectiveReward({self.objective!r}, {self.source!r})"


@torch.no_grad()
def prompt_shared_log_probs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    pref: torch.Tensor | None = None,
    batch_size: int = 16,
    max_length: int = 1024,
    max_prompt_length: int = 256,
    length_normalize: bool = False,
) -> torch.Tensor:
    """``Σ_t log π(y_t | x, y_<t)`` per (prompt, response), each distinct prompt read once.

    The distinct prompts (less their last token) run in one left-padded forward that fills a KV
    cache; each response row then continues from its prompt's cache rows, starting with the
    prompt's last token. Tokenized as :func:`align.rewards.encode_responses` does (chat template,
    EOS after the response, the same cuts), so the scores are those of
    :func:`align.rewards.arm_rewards` with the same settings. ``pref``: one α per response row
    ``(N, m)`` for a PARM (each row's prompt is read at that row's α, so rows of one prompt
    share its cache only when they share α). Scored by
    :func:`align.rewards.scoring.continuation_log_probs`, the trainers' prompt-shared scoring.
    """
    from align.adapters import set_preference

    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = torch.zeros(len(prompts), dtype=torch.float32)
    # Rows sharing a prompt (and α) share its cache; chunks of distinct prompts keep memory flat.
    keys: dict[Any, list[int]] = {}
    for row, prompt in enumerate(prompts):
        key = (prompt, None if pref is None else tuple(pref[row].tolist()))
        keys.setdefault(key, []).append(row)
    groups = list(keys.items())
    for start in range(0, len(groups), batch_size):
        chunk = groups[start : start + batch_size]
        prompt_ids = [
            tokenize_prompt(tokenizer, key[0], max_prompt_length=max_prompt_length)
            for key, _ in chunk
        ]
        prefix_width = max(len(ids) - 1 for ids in prompt_ids)
        prefix = torch.full((len(chunk), max(prefix_width, 1)), pad)
        prefix_mask = torch.zeros_like(prefix)
        for index, ids in enumerate(prompt_ids):  # left padding
            if len(ids) > 1:
                prefix[index, prefix.shape[1] - len(ids) + 1 :] = torch.tensor(ids[:-1])
                prefix_mask[index, prefix.shape[1] - len(ids) + 1 :] = 1
        rows = [row for _, members in chunk for row in members]
        owner = torch.tensor([index for index, (_, members) in enumerate(chunk) for _ in members])
        continuation, completion = [], []
        for index, (_, members) in enumerate(chunk):
            for row in members:
                room = max(1, max_length - len(prompt_ids[index]))
                response = tokenize_response(tokenizer, responses[row], room)
                continuation.append([prompt_ids[index][-1], *response])
                completion.append([0] + [1] * len(response))
        width = max(len(ids) for ids in continuation)
        cont = torch.tensor([ids + [pad] * (width - len(ids)) for ids in continuation])
        cont_mask = torch.tensor(
            [[1] * len(ids) + [0] * (width - len(ids)) for ids in continuation]
        )
        completion_mask = torch.tensor([c + [0] * (width - len(c)) for c in completion])
        prefix, prefix_mask = prefix.to(device), prefix_mask.to(device)
        if pref is not None:
            first = [members[0] for _, members in chunk]
            set_preference(model, pref[first])
        cache = prompt_cache(model, prefix, prefix_mask)
        if pref is not None:
            set_preference(model, pref[rows])
        with fused_head(model):
            log_probs = continuation_log_probs(
                model,
                cache,
                owner.to(device),
                prefix_mask,
                cont.to(device),
                cont_mask.to(device),
                completion_mask.to(device),
            )
        total = log_probs.score(length_normalize)
        scores[torch.tensor(rows)] = total.float().cpu()
    return scores


class LanguageModelReward:
    """An ARM or PARM adapter folder as a reward source (loaded once, frozen)."""

    def __init__(
        self, folder: str, base: str | None = None, batch_size: int = 16, device: Any = None
    ) -> None:
        from align.decoding.loading import load_guide

        path = Path(folder).expanduser()
        if not (path / "adapter_config.json").is_file():
            raise ValueError(f"{folder} is not an adapter folder (no adapter_config.json)")
        self.folder = str(path)
        options = {} if device is None else {"device": str(device)}
        self.model, self.tokenizer = load_guide(self.folder, base, **options)
        self.model.eval().requires_grad_(False)
        self.settings = reward_settings(path)
        self.batch_size = batch_size

    @property
    def objectives(self) -> tuple[str, ...]:
        from align.adapters import objectives_of

        return tuple(objectives_of(self.model))

    def scores(
        self, prompts: list[str], responses: list[str], pref: torch.Tensor | None = None
    ) -> torch.Tensor:
        return prompt_shared_log_probs(
            self.model,
            self.tokenizer,
            prompts,
            responses,
            pref=pref,
            batch_size=self.batch_size,
            **self.settings,
        )


class _PARMVertices:
    """One PARM serving several objectives: every objective's vertex scored in one batched call
    per TRL reward call, which TRL makes per objective in order; the first objective's call
    scores them all and the others read the result."""

    def __init__(self, parm: LanguageModelReward, objectives: Sequence[str]) -> None:
        self.parm = parm
        self.objectives = list(objectives)
        self._cached: tuple[Any, dict[str, torch.Tensor]] | None = None

    def score(self, objective: str, prompts: list[str], responses: list[str]) -> torch.Tensor:
        key = (tuple(prompts), tuple(responses))
        if self._cached is None or self._cached[0] != key:
            names = self.parm.objectives
            n = len(prompts)
            vertex = torch.eye(len(names), dtype=torch.float64)
            wanted = [names.index(name) for name in self.objectives]
            pref = vertex[wanted].repeat_interleave(n, dim=0)
            values = self.parm.scores(prompts * len(wanted), responses * len(wanted), pref)
            self._cached = (
                key,
                {name: values[i * n : (i + 1) * n] for i, name in enumerate(self.objectives)},
            )
        return self._cached[1][objective]


class CombinedPARMReward:
    """One PARM as one reward, scored at each completion's own α (the trainer's rows): the
    reward of the trade-off the row was generated for, ``r(x, y; α)``. ``trainer`` is set by
    :class:`~align.trainers.grpo.MOGRPOTrainer`, whose rows' α it reads."""

    __name__ = "combined"

    def __init__(self, spec: str, base: str | None = None, device: Any = None) -> None:
        kind, _, folder = spec.partition(":")
        if kind != "parm" or not folder:
            raise ValueError(f"combined_reward must be parm:PATH (a PARM adapter), got {spec!r}")
        self.parm = LanguageModelReward(folder, base, device=device)
        self.source = spec
        self.trainer: Any = None

    @property
    def objectives(self) -> tuple[str, ...]:
        return self.parm.objectives

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any):
        rows = getattr(self.trainer, "_row_preference", None)
        if rows is None or len(rows) != len(prompts):
            raise RuntimeError("the combined PARM reward scores rows of a MOGRPOTrainer batch")
        texts = [text_of(p) for p in prompts], [text_of(c) for c in completions]
        return self.parm.scores(*texts, pref=rows.to(torch.float64)).tolist()


def objective_rewards(
    objectives: Sequence[str],
    specs: Mapping[str, RewardSpec] | Sequence[RewardSpec],
    *,
    base: str | None = None,
    tokenizer: Any = None,
    max_new_tokens: int | None = None,
    device: Any = None,
) -> list[Callable[..., list[float | None]]]:
    """One TRL reward function per objective, in ``objectives`` order.

    ``specs``: a mapping objective → spec (its keys must be exactly the objectives), or a list
    of specs in objective order. ``base``: the model an adapter folder that names no base was
    trained on (the policy's); ``tokenizer`` / ``max_new_tokens``: what ``brevity`` counts with
    and against; ``device``: where reward models run (default: where they load, the CPU).
    Bad specs raise ``ValueError`` naming the objective.
    """
    from align.preference import check_objectives

    objectives = list(check_objectives(objectives))
    if isinstance(specs, Mapping):
        missing = [name for name in objectives if name not in specs]
        extra = [name for name in specs if name not in objectives]
        if missing or extra:
            raise ValueError(
                f"the rewards must name exactly the objectives {objectives}: "
                + "; ".join(
                    part
                    for part in (
                        f"no reward for {missing}" if missing else "",
                        f"rewards for unknown objectives {extra}" if extra else "",
                    )
                    if part
                )
            )
        ordered = [specs[name] for name in objectives]
    else:
        ordered = list(specs)
        if len(ordered) != len(objectives):
            raise ValueError(
                f"got {len(ordered)} rewards for {len(objectives)} objectives {objectives}"
            )
    models: dict[str, LanguageModelReward] = {}
    parm_users: dict[str, list[str]] = {}
    for name, spec in zip(objectives, ordered):
        if isinstance(spec, str) and spec.startswith("parm:"):
            parm_users.setdefault(spec.removeprefix("parm:"), []).append(name)
    vertices: dict[str, _PARMVertices] = {}
    functions = []
    for name, spec in zip(objectives, ordered):
        if callable(spec):
            functions.append(_Renamed(spec, name))
            continue
        if isinstance(spec, Mapping):
            functions.append(_scorer_reward(name, spec, tokenizer, max_new_tokens, device))
            continue
        if not isinstance(spec, str) or not spec:
            raise ValueError(
                f"reward of {name!r}: expected a spec string or a callable, got {spec!r}"
            )
        kind, _, argument = spec.partition(":")
        if kind in ("arm", "parm"):
            if not argument:
                raise ValueError(
                    f"reward of {name!r}: {kind}: needs an adapter folder ({kind}:PATH)"
                )
            if argument not in models:
                models[argument] = LanguageModelReward(argument, base, device=device)
            model = models[argument]
            if kind == "arm":
                functions.append(
                    ObjectiveReward(
                        name, lambda p, r, model=model: model.scores(p, r).tolist(), spec
                    )
                )
                continue
            if name not in model.objectives:
                raise ValueError(
                    f"reward of {name!r}: the PARM in {argument} has objectives "
                    f"{list(model.objectives)}, not {name!r}"
                )
            if argument not in vertices:
                vertices[argument] = _PARMVertices(model, parm_users[argument])
            shared = vertices[argument]
            functions.append(
                ObjectiveReward(
                    name, lambda p, r, s=shared, n=name: s.score(n, p, r).tolist(), spec
                )
            )
            continue
        if kind == "python":
            functions.append(_Renamed(_import_function(name, argument), name))
            continue
        functions.append(_scorer_reward(name, {"name": spec}, tokenizer, max_new_tokens, device))
    return functions


def _scorer_reward(
    objective: str,
    spec: Mapping[str, Any],
    tokenizer: Any,
    max_new_tokens: int | None,
    device: Any = None,
) -> ObjectiveReward:
    from align.scorers import get_scorer

    options = dict(spec)
    scorer_name = options.pop("name", None)
    options.pop("bounds", None)  # a report's scale (sweep configs' scorer entries), not a reward's
    if not isinstance(scorer_name, str):
        raise ValueError(f"reward of {objective!r}: a mapping needs 'name' (a scorer), got {spec}")
    if scorer_name == "brevity":
        options.setdefault("tokenizer", tokenizer)
        if max_new_tokens:
            options.setdefault("max_tokens", max_new_tokens)
    if scorer_name.partition(":")[0] == "reward-model" and device is not None:
        options.setdefault("device", str(device))
    try:
        scorer = get_scorer(scorer_name, **options)
    except (ValueError, TypeError) as error:
        raise ValueError(f"reward of {objective!r}: {error}") from error
    shown = sorted(set(options) - {"tokenizer", "device"})
    source = f"{scorer_name} {shown}" if shown else scorer_name
    return ObjectiveReward(objective, lambda p, r, s=scorer: s.score(p, r).tolist(), source)


def _import_function(objective: str, reference: str) -> Callable[..., Any]:
    import importlib

    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise ValueError(
            f"reward of {objective!r}: python: needs package.module:function, got {reference!r}"
        )
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"reward of {objective!r}: cannot import {reference}: {error}") from error
    if not callable(function):
        raise ValueError(f"reward of {objective!r}: {reference} is not callable")
    return function


class _Renamed:
    """A user's reward function under its objective's name (TRL logs by ``__name__``); it gets
    TRL's arguments unchanged."""

    def __init__(self, function: Callable[..., Any], objective: str) -> None:
        self.function, self.__name__ = function, objective

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)
