"""What guides a decoding: which models score the next token, and how α weights their scores.

At every step each model scores the next token and the scores are mixed per row::

    PARM:    log π(y|·) = log π_base + (1/β) · log π_PARM(y | ·, α)          (α injected into PARM)
    GenARM:  log π(y|·) = log π_base + (1/β) · Σ_j α_j · log π_ARM_j
    MOD:     log π(y|·) = Σ_j α_j · log π_j                                   (m policies, no base)
    policy:  log π(y|·) = log π_policy(y | ·, α)         (one policy with a preference adapter)

then renormalised. MOD's other f-divergence forms (forward KL, Jensen-Shannon, α-divergences)
mix the policies' probabilities through the base as the reference policy π_ref, with a normaliser
solved for at every step (:mod:`align.decoding.divergences`). A :class:`Guidance` only names the
models and the formula; :class:`align.decoding.batch.DecodingBatch` decodes with it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from align.preference import Preference

Mode = Literal["parm", "genarm", "mod", "policy"]
MODES = ("parm", "genarm", "mod", "policy")


@dataclass
class Guidance:
    """Which models guide the base, and how their scores are weighted by α.

    Build one with :func:`parm_guidance`, :func:`genarm_guidance`, :func:`mod_guidance` or
    :func:`policy_guidance`.
    """

    mode: Mode
    models: list[nn.Module]
    objectives: tuple[str, ...]
    beta: float = 1.0
    tokenizers: list[Any] = field(default_factory=list)
    #: MOD only: the f-divergence whose closed form mixes the policies, and an α-divergence's
    #: order (see :mod:`align.decoding.divergences`).
    divergence: str = "reverse_kl"
    divergence_alpha: float | None = None
    #: policy only: how a batch's α reaches the policy (``None`` clears it), for a policy whose α
    #: is not a preference adapter's (a LoRA soup's per-row weights, :mod:`align.decoding.soup`).
    #: Default: :func:`align.adapters.set_preference`.
    set_preference: Callable[[Preference | None], None] | None = None

    def __post_init__(self) -> None:
        from align.decoding.divergences import check_divergence

        if self.mode not in MODES:
            raise ValueError(f"guidance mode must be one of {MODES}, got {self.mode!r}")
        self.divergence_alpha = check_divergence(self.divergence, self.divergence_alpha)
        if self.mode != "mod" and self.divergence != "reverse_kl":
            raise ValueError(
                f"divergence {self.divergence!r} is a form of MOD; {self.mode} guidance adds "
                "log-probs (reverse_kl)"
            )
        if not self.beta > 0:  # also rejects NaN; inf means no guidance
            raise ValueError(f"beta must be > 0 (or inf for no guidance), got {self.beta}")
        if self.set_preference is not None and self.mode != "policy":
            raise ValueError(f"set_preference is for policy guidance, not {self.mode}")
        expected = 1 if self.mode in ("parm", "policy") else len(self.objectives)
        if len(self.models) != expected:
            raise ValueError(
                f"{self.mode} guidance needs {expected} model(s), got {len(self.models)}"
            )

    @property
    def needs_base(self) -> bool:
        """Whether decoding needs the base model: as the model guided (PARM, GenARM), or as
        MOD's reference policy (every form but the reverse KL, where π_ref cancels); a policy
        decodes alone."""
        return self.mode in ("parm", "genarm") or (
            self.mode == "mod" and self.divergence != "reverse_kl"
        )


def parm_guidance(arm: nn.Module, beta: float = 1.0, tokenizer: Any = None) -> Guidance:
    """One PARM (an ARM with a preference adapter); α is injected into it."""
    from align.adapters import objectives_of

    return Guidance(
        "parm", [arm], objectives_of(arm), beta, [tokenizer] if tokenizer is not None else []
    )


def genarm_guidance(
    arms: Mapping[str, nn.Module], beta: float = 1.0, tokenizers: Sequence[Any] = ()
) -> Guidance:
    """One ARM per objective, ``{"helpful": arm_1, "harmless": arm_2}``; weighted by α_j / β."""
    return Guidance("genarm", list(arms.values()), tuple(arms), beta, list(tokenizers))


def mod_guidance(
    policies: Mapping[str, nn.Module],
    tokenizers: Sequence[Any] = (),
    divergence: str = "reverse_kl",
    divergence_alpha: float | None = None,
) -> Guidance:
    """MOD: one aligned policy per objective, mixed with weights α. ``divergence``: the
    f-divergence the policies were regularised with — ``reverse_kl`` (log-probs mixed linearly,
    no base), ``forward_kl``, ``jensen_shannon`` or ``alpha`` (order ``divergence_alpha`` > 0);
    every form but ``reverse_kl`` takes the base model passed to the decoder as π_ref."""
    return Guidance(
        "mod",
        list(policies.values()),
        tuple(policies),
        1.0,
        list(tokenizers),
        divergence=divergence,
        divergence_alpha=divergence_alpha,
    )


def policy_guidance(
    policy: nn.Module,
    tokenizer: Any = None,
    *,
    objectives: Sequence[str] | None = None,
    set_preference: Callable[[Preference | None], None] | None = None,
) -> Guidance:
    """A policy with a preference adapter (SVD-LoRA / PBLoRA) decoding on its own, α injected
    per row: plain decoding, with each row at its own α. A policy steered some other way gives
    its ``objectives`` and the ``set_preference`` that steers it."""
    if objectives is None:
        from align.adapters import objectives_of

        objectives = objectives_of(policy)
    return Guidance(
        "policy",
        [policy],
        tuple(objectives),
        1.0,
        [tokenizer] if tokenizer is not None else [],
        set_preference=set_preference,
    )


# --- tokenizer agreement -------------------------------------------------------------------


def check_same_tokenizer(base_tokenizer: Any, other: Any, other_name: str = "the ARM") -> None:
    """Base and guiding models must share the tokenizer: token i must mean the same thing."""
    base_vocab, other_vocab = base_tokenizer.get_vocab(), other.get_vocab()
    problems = []
    if len(base_vocab) != len(other_vocab):
        problems.append(f"vocabulary sizes differ ({len(base_vocab)} vs {len(other_vocab)})")
    differing = sorted(
        (token for token, index in base_vocab.items() if other_vocab.get(token) != index),
        key=base_vocab.get,
    )
    if differing:
        examples = ", ".join(
            f"{t!r}: {base_vocab[t]} vs {other_vocab.get(t)}" for t in differing[:3]
        )
        problems.append(f"{len(differing)} tokens map to different ids (e.g. {examples})")
    for special in ("eos_token_id", "pad_token_id", "bos_token_id"):
        ours, theirs = getattr(base_tokenizer, special, None), getattr(other, special, None)
        if ours is not None and theirs is not None and ours != theirs:
            problems.append(f"{special} differs ({ours} vs {theirs})")
    if problems:
        raise ValueError(
            f"the base model and {other_name} do not share a tokenizer: "
            + "; ".join(problems)
            + ". Guided decoding adds per-token scores, so every model must use the same vocabulary."
        )
