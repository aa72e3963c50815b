"""The config every align preference trainer (ARM, PARM, preference DPO) reads, and its checks.

:class:`MultiObjectivePreferenceConfig` adds align's fields to TRL's ``DPOConfig``: the
objectives and their β, the multi-gradient method, how α is drawn, and how a response is scored.
Settings that cannot work together fail here, when the config is built, not mid-run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from trl import DPOConfig

from align.preference import check_objectives
from align.trainers.options import AlignTrainingDefaults


@dataclass
class MultiObjectivePreferenceConfig(AlignTrainingDefaults, DPOConfig):
    """Fields every align preference trainer adds to TRL's ``DPOConfig``."""

    objectives: list[str] | None = field(
        default=None,
        metadata={"help": "Objectives to train on, in α order; default: all of the dataset's."},
    )
    betas: dict[str, float] | None = field(
        default=None,
        metadata={"help": "Per-objective β by name; objectives not named use `beta`."},
    )
    aggregator: str = field(
        default="linear",
        metadata={"help": "Multi-gradient method (align.mograd.get_aggregator name)."},
    )
    aggregator_options: dict[str, Any] | None = field(
        default=None, metadata={"help": "Keyword options of the aggregator."}
    )
    feature_level: bool = field(
        default=False,
        metadata={
            "help": "Gradient-level aggregators: take the Gram from the gradients of the pair "
            "scores (one backward; an approximation) instead of the adapter parameters."
        },
    )
    aggregator_accumulation: str = field(
        default="micro",
        metadata={
            "help": "Gradient-level aggregators under gradient accumulation: weights per "
            "micro-batch ('micro') or once per optimizer step ('full'; needed under ZeRO)."
        },
    )
    allow_preference_blind_aggregator: bool = field(
        default=False,
        metadata={
            "help": "PARM / preference DPO: allow an aggregator whose update ignores α (MGDA, "
            "PCGrad, Nash-MTL, DWA, FAMO, ...; refused by default). α is still set on the "
            "adapter each batch, but the update no longer depends on it, so nothing pushes the "
            "α path to tell the objectives apart: the adapter learns one α-agnostic trade-off "
            "(the method's), and moving α at inference changes little except by chance."
        },
    )
    preference_concentration: float = field(
        default=1.0, metadata={"help": "p of the Dirichlet(p·1) that α is drawn from per batch."}
    )
    preference_sampling: str = field(
        default="batch",
        metadata={
            "help": "'batch': one α per micro-batch (PARM, Panacea); 'pair': one α per pair, "
            "each pair's loss weighted by its own α (Σ_i α_i ℓ_i per pair; linear "
            "scalarization only). Per pair, a run of N steps of B pairs sees N·B preferences "
            "instead of N, which is what the α path learns from."
        },
    )
    max_prompt_length: int = field(
        default=256, metadata={"help": "Prompts keep their last max_prompt_length tokens."}
    )
    max_length: int | None = field(
        default=1024, metadata={"help": "Prompt + response tokens per row."}
    )
    share_prompt: bool = field(
        default=True,
        metadata={
            "help": "Read each pair's prompt once: its KV cache serves both responses (the same "
            "scores and gradients as two full rows, with about a quarter fewer tokens on short "
            "answers). Off under gradient checkpointing, which recomputes the cache's writes."
        },
    )
    length_normalize: bool = field(
        default=False,
        metadata={
            "help": "Score a response by its mean token log-prob instead of the sum (SimPO-style; "
            "the references sum). A summed score already ranks a shorter answer higher, so pairs "
            "that differ in length saturate the loss before anything else is learned; use a "
            "larger beta (about 1-5) with it."
        },
    )
    nll_weight: float = field(
        default=0.0,
        metadata={
            "help": "λ of a language-model anchor added to the training loss: λ times the mean "
            "token NLL of both responses of every pair under the model being trained (at the "
            "pair's α). A summed-log-prob score can win a 'shorter is better' objective by "
            "making every token unlikely (the margin grows with a uniform drop), which leaves "
            "an ARM that derails guided decoding into letter salad; the anchor keeps its "
            "log-probs those of a language model. 0 (the references): off."
        },
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules the added adapter wraps (ARM / PARM); default: the attention q/k/v "
            "projections, as in GenARM and PARM."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.objectives is not None:
            self.objectives = list(check_objectives(self.objectives))
        if not self.preference_concentration > 0:
            raise ValueError(
                f"preference_concentration must be > 0, got {self.preference_concentration}"
            )
        for name, beta in (self.betas or {}).items():
            if not beta > 0:
                raise ValueError(f"beta of objective {name!r} must be > 0, got {beta}")
        if self.precompute_ref_log_probs:
            raise ValueError("precompute_ref_log_probs is not supported by align's trainers")
        if self.preference_sampling not in ("batch", "pair"):
            raise ValueError(
                f"preference_sampling must be 'batch' or 'pair', got {self.preference_sampling!r}"
            )
        if not (self.nll_weight >= 0 and math.isfinite(self.nll_weight)):
            raise ValueError(f"nll_weight must be a finite number >= 0, got {self.nll_weight}")
        if self.preference_sampling == "pair" and self.aggregator not in ("linear", "ls"):
            raise ValueError(
                "preference_sampling='pair' weights each pair's losses by its own α, which is "
                f"linear scalarization; aggregator {self.aggregator!r} takes one α per step: "
                "use preference_sampling='batch' with it"
            )
