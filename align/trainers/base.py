"""What ARM, PARM and preference-DPO training share, on top of TRL's ``DPOTrainer``.

All three read the multi-objective preference schema, score both responses of a pair in one
forward (TRL's fused LM head: no ``(B, T, V)`` logits), turn the scores into one pairwise loss
per objective (ties skipped per objective), and hand the m losses to the multi-gradient core,
whose scalar goes to ``accelerator.backward`` — so gradient accumulation, mixed precision,
clipping, DDP and DeepSpeed stay TRL's and Accelerate's.

α for a training step is drawn from Dirichlet(p·1) with a generator seeded by
``(seed, global_step, micro-step)``: every process draws the same α, a run resumed from a
checkpoint draws what the uninterrupted run drew, and there is no sampler state to save.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import PeftModel
from trl import DPOConfig, DPOTrainer

from align.data.schema import TIE
from align.mograd.engine import MultiObjectiveEngine
from align.preference import Preference, check_objectives, sample_preferences
from align.rewards.arm import prompt_cache
from align.trainers.checkpoints import (  # noqa: F401  (re-exported: the tests' names)
    MOGRAD_SHARD_STATE,
    MOGRAD_STATE,
    AtomicCheckpoints,
)
from align.trainers.data import (
    TOKENIZED_COLUMNS,
    MultiObjectivePreferenceCollator,
    select_objectives,
    tokenize_preference_dataset,
)
from align.trainers.options import AlignTrainingDefaults, add_aggregator_parameters


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


def _checkpointing(model: Any) -> bool:
    """Whether ``model`` recomputes activations in backward, under either name transformers used."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        try:
            return bool(getattr(model, name))
        except AttributeError:
            continue
    return False


class MultiObjectivePreferenceTrainer(AtomicCheckpoints, DPOTrainer):
    """Base of :class:`ARMTrainer`, :class:`PARMTrainer` and :class:`PreferenceDPOTrainer`.

    Subclasses say how a pair is scored (:meth:`pair_scores`) and whether α conditions the
    model (:attr:`conditioned`).
    """

    _tag_names = ["trl", "align"]
    #: True when the model carries a preference adapter that α is set on per batch.
    conditioned = True
    #: Objective count the trainer supports (None: any).
    single_objective = False

    def __init__(
        self,
        model: Any,
        args: MultiObjectivePreferenceConfig,
        train_dataset: Dataset,
        eval_dataset: Dataset | None = None,
        processing_class: Any = None,
        peft_config: Any = None,
        callbacks: Sequence[Any] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        ref_model: Any = None,
    ) -> None:
        if self.conditioned:
            from align.mograd.registry import require_preference_aware

            require_preference_aware(
                args.aggregator, type(self).__name__, args.allow_preference_blind_aggregator
            )
        self.objectives = select_objectives(train_dataset, args.objectives)
        if self.single_objective and len(self.objectives) != 1:
            raise ValueError(
                f"{type(self).__name__} trains one objective; the dataset has "
                f"{list(self.objectives)}: set `objectives: [<name>]` in the config"
            )
        if eval_dataset is not None:
            select_objectives(eval_dataset, self.objectives)
        unknown = sorted(set(args.betas or {}) - set(self.objectives))
        if unknown:
            raise ValueError(f"betas names {unknown}, which are not among {list(self.objectives)}")
        self.betas = torch.tensor(
            [float((args.betas or {}).get(name, args.beta)) for name in self.objectives]
        )
        created_ref = isinstance(model, PeftModel) and peft_config is None and ref_model is None
        pad_id = processing_class.pad_token_id
        if pad_id is None:
            pad_id = processing_class.eos_token_id
        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            data_collator=MultiObjectivePreferenceCollator(
                pad_token_id=pad_id, pad_to_multiple_of=args.pad_to_multiple_of
            ),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=list(callbacks or []),
            optimizers=optimizers,
            peft_config=peft_config,
        )
        unwrapped = self.accelerator.unwrap_model(self.model)
        if created_ref and "ref" in getattr(unwrapped, "peft_config", {}):
            # TRL copies a ready adapter into a "ref" adapter; align's reference (preference DPO)
            # is the base model with the adapter off, and ARM / PARM need none.
            unwrapped.delete_adapter("ref")
            unwrapped.set_adapter("default")
        if self.conditioned:
            from align.adapters import objectives_of as adapter_objectives
            from align.preference import require_same_objectives

            require_same_objectives(
                adapter_objectives(unwrapped), self.objectives, "the adapter", "the dataset"
            )
        self.engine = MultiObjectiveEngine(
            args.aggregator,
            [p for p in self.model.parameters() if p.requires_grad],
            accelerator=self.accelerator,
            feature_level=args.feature_level,
            accumulation=args.aggregator_accumulation,
            **(args.aggregator_options or {}),
        )
        if args.nll_weight and self.engine.is_gradient_level:
            # The engine differentiates each objective itself and hands back a scalar carrying
            # the combined gradient; an anchor outside it would need a second backward.
            raise ValueError(
                f"nll_weight is added to the loss of a loss-level method (linear, tchebycheff, "
                f"...); {args.aggregator!r} combines per-objective gradients: set nll_weight: 0"
            )
        self._alpha_step, self._alpha_micro = -1, 0
        self._response_nll: torch.Tensor | None = None

    # ----------------------------------------------------------------------------- data
    def _prepare_dataset(self, dataset: Dataset, processing_class: Any, args: Any, name: str):
        return tokenize_preference_dataset(
            dataset,
            processing_class,
            self.objectives,
            max_length=args.max_length or 1024,
            max_prompt_length=args.max_prompt_length,
            num_proc=args.dataset_num_proc,
        )

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = list(TOKENIZED_COLUMNS)

    # ------------------------------------------------------------------------ preference
    def training_preference(self, pairs: int | None = None) -> torch.Tensor:
        """α for the current micro-batch: Dirichlet(p·1), seeded by (seed, step, micro-step);
        ``(m,)``, or ``(pairs, m)`` (one per pair) when ``pairs`` is given."""
        step = self.state.global_step
        if step != self._alpha_step:
            self._alpha_step, self._alpha_micro = step, 0
        rng = np.random.default_rng([self.args.seed, step, self._alpha_micro])
        self._alpha_micro += 1
        return sample_preferences(
            len(self.objectives),
            pairs,
            concentration=self.args.preference_concentration,
            generator=rng,
        ).float()

    def set_model_preference(self, model: Any, preference: torch.Tensor) -> None:
        from align.adapters import set_preference

        set_preference(self.accelerator.unwrap_model(model), preference)

    # --------------------------------------------------------------------------- scoring
    def sequence_log_probs(self, model: Any, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Summed (``length_normalize``: mean) response-token log-probs per row (2B,), through
        TRL's fused LM head; with ``share_prompt``, each pair's prompt is read once."""
        if self._shares_prompt(model, inputs):
            total, tokens = self._prompt_shared_log_probs(model, inputs)
        else:
            labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
            outputs = model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                labels=labels,
                fused_lm_head=True,
                use_cache=False,
            )
            width = inputs["completion_mask"].shape[1] - 1
            total = outputs.log_probs[:, -width:].sum(dim=1)
            tokens = inputs["completion_mask"][:, 1:].sum(dim=1)
        mean = total / tokens.clamp(min=1).to(total)
        if self.args.nll_weight and torch.is_grad_enabled() and model.training:
            # The trained model's scores (not a reference's, scored under no_grad): what the
            # loss's language-model anchor is computed from.
            self._response_nll = -mean.mean()
        return mean if self.args.length_normalize else total

    def _shares_prompt(self, model: Any, inputs: Mapping[str, torch.Tensor]) -> bool:
        unwrapped = self.accelerator.unwrap_model(model)
        # transformers 5.23 renamed gradient checkpointing activation checkpointing (the old
        # name warns); older versions have only the old name.
        checkpointing = _checkpointing(unwrapped)
        return (
            self.args.share_prompt
            and "prefix_ids" in inputs
            and inputs["prefix_ids"].shape[1] > 0
            and not (checkpointing and model.training)
        )

    def _prompt_shared_log_probs(
        self, model: Any, inputs: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompts (less their last token) in one forward of B rows, then both responses of
        every pair on a copy of that KV cache: exactly the two-full-rows scores, gradients
        through the cache included."""
        from transformers import DynamicCache

        prefix, prefix_mask = inputs["prefix_ids"], inputs["prefix_mask"]
        with self._pair_rows(model, prefix.shape[0]):
            cache = prompt_cache(model, prefix, prefix_mask)
        shared = DynamicCache()
        for index, layer in enumerate(cache.layers):
            shared.update(layer.keys.repeat(2, 1, 1, 1), layer.values.repeat(2, 1, 1, 1), index)
        continuation = inputs["continuation_ids"]
        completion = inputs["continuation_completion_mask"]
        start = prefix_mask.sum(dim=1).repeat(2)[:, None]
        outputs = model(
            input_ids=continuation,
            attention_mask=torch.cat([prefix_mask.repeat(2, 1), inputs["continuation_mask"]], 1),
            position_ids=start + torch.arange(continuation.shape[1], device=start.device),
            cache=shared,
            labels=continuation.masked_fill(completion == 0, -100),
            fused_lm_head=True,
            use_cache=False,
        )
        return outputs.log_probs.sum(dim=1), completion.sum(dim=1)

    @contextlib.contextmanager
    def _pair_rows(self, model: Any, pairs: int):
        """A per-row α set for the 2B response rows (``[α; α]``, :meth:`_per_pair_loss`), cut
        to its first B rows for a forward over one row per pair, then put back."""
        from align.adapters.base import PreferenceTuner

        tuner = getattr(self.accelerator.unwrap_model(model), "base_model", None)
        preference = tuner.get_preference() if isinstance(tuner, PreferenceTuner) else None
        if preference is None or not preference.is_batched or len(preference) == pairs:
            yield
            return
        tuner.set_preference(Preference(preference.weights[:pairs], preference.objectives))
        try:
            yield
        finally:
            tuner.set_preference(preference)

    def pair_scores(
        self, model: Any, inputs: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The score of response_0 and of response_1, each (B,); higher means preferred."""
        return self.sequence_log_probs(model, inputs).chunk(2)

    def objective_losses(
        self,
        scores_0: torch.Tensor,
        scores_1: torch.Tensor,
        preferred: torch.Tensor,
        pair_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per objective: mean ``−log σ(β_i (s_w − s_l))`` over its decided pairs (each pair's
        term times ``pair_weights[pair, i]`` when given), the pairwise accuracy, and the number
        of decided pairs. An objective with none contributes 0."""
        decided = preferred != TIE
        sign = torch.where(preferred == 0, 1.0, -1.0).to(scores_0)
        margins = (scores_0 - scores_1).unsqueeze(1) * sign  # (B, m): s_w − s_l
        per_pair = -F.logsigmoid(self.betas.to(margins) * margins)
        if pair_weights is not None:
            per_pair = per_pair * pair_weights.to(per_pair)
        counts = decided.sum(dim=0)
        losses = (per_pair * decided).sum(dim=0) / counts.clamp(min=1)
        accuracy = ((margins.detach() > 0) & decided).sum(dim=0) / counts.clamp(min=1)
        return losses, accuracy, counts

    # ------------------------------------------------------------------------------ loss
    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool):
        mode = "train" if self.model.training else "eval"
        preferred = inputs["preferred"]
        if mode == "train" and self.conditioned and self.args.preference_sampling == "pair":
            loss = self._per_pair_loss(model, inputs, preferred)
        elif mode == "train":
            preference = self.training_preference() if self.conditioned else None
            if preference is not None:
                self.set_model_preference(model, preference)
            scores = self.pair_scores(model, inputs)
            losses, accuracy, counts = self.objective_losses(*scores, preferred)
            # Stateful methods (DWA's history, FAMO's logits) are observed by the engine, once
            # per optimizer step, on the mean of the step's micro-batch losses.
            features = torch.cat(scores) if self.args.feature_level else None
            loss = self.engine(losses, preference, features=features)
            self._log_objectives(mode, losses, accuracy, counts, preference)
        else:
            loss = self._evaluation_loss(model, inputs, preferred)
        if mode == "train" and self.args.nll_weight:
            loss = loss + self._language_model_anchor(mode)
        if return_outputs:
            return loss, {"logits": torch.zeros(0)}
        return loss

    def _language_model_anchor(self, mode: str) -> torch.Tensor:
        """``nll_weight`` × the mean token NLL of this micro-batch's responses (logged as
        ``nll``), outside the multi-objective aggregation: it belongs to no objective."""
        nll = self._response_nll
        self._response_nll = None
        gathered = self.accelerator.gather(nll.detach().float().reshape(1)).mean()
        self._metrics[mode]["nll"].append(float(gathered))
        return self.args.nll_weight * nll

    def _per_pair_loss(self, model: Any, inputs: dict[str, Any], preferred: torch.Tensor):
        """``Σ_i (1/n_i) Σ_pairs α_i ℓ_i``: each pair scored at, and weighted by, its own α
        (its two responses share it); in expectation the batch-α loss ``Σ_i α_i L_i``."""
        alpha = self.training_preference(pairs=preferred.shape[0])
        self.set_model_preference(model, torch.cat([alpha, alpha]))  # rows: [resp_0; resp_1]
        scores = self.pair_scores(model, inputs)
        weighted, accuracy, counts = self.objective_losses(*scores, preferred, alpha)
        losses, _, _ = self.objective_losses(*(s.detach() for s in scores), preferred)
        self.engine.last_weights = alpha.mean(dim=0)
        self._log_objectives("train", losses, accuracy, counts, alpha.mean(dim=0))
        return weighted.sum()

    def _evaluation_loss(self, model: Any, inputs: dict[str, Any], preferred: torch.Tensor):
        """Each objective judged at its own vertex α (α = e_i), where a PARM should order pairs
        by that objective alone; the loss reported is the mean over objectives."""
        m = len(self.objectives)
        losses, accuracy, counts = (torch.zeros(m) for _ in range(3))
        for index in range(m if self.conditioned else 1):
            if self.conditioned:
                self.set_model_preference(model, torch.eye(m)[index])
            all_losses, all_accuracy, all_counts = self.objective_losses(
                *self.pair_scores(model, inputs), preferred
            )
            for target in [index] if self.conditioned else range(m):
                losses[target] = all_losses[target].detach().float().cpu()
                accuracy[target] = all_accuracy[target].float().cpu()
                counts[target] = all_counts[target].float().cpu()
        self._log_objectives("eval", losses, accuracy, counts, None)
        return losses.mean().to(self.accelerator.device)

    def _log_objectives(
        self,
        mode: str,
        losses: torch.Tensor,
        accuracy: torch.Tensor,
        counts: torch.Tensor,
        preference: torch.Tensor | None,
    ) -> None:
        device = self.accelerator.device
        counts = counts.float().cpu()
        stacked = torch.stack(
            [losses.detach().float().cpu() * counts, accuracy.float().cpu() * counts, counts]
        )
        # Means over every process's decided pairs (an objective with none logs nothing).
        stacked = self.accelerator.gather(stacked.to(device).unsqueeze(0)).sum(dim=0)
        weights = self.engine.last_weights if mode == "train" else None
        for i, name in enumerate(self.objectives):
            if stacked[2, i] > 0:
                self._metrics[mode][f"loss/{name}"].append(float(stacked[0, i] / stacked[2, i]))
                self._metrics[mode][f"accuracy/{name}"].append(float(stacked[1, i] / stacked[2, i]))
            if preference is not None:
                self._metrics[mode][f"alpha/{name}"].append(float(preference[i]))
            if weights is not None and len(weights) == len(self.objectives):
                self._metrics[mode][f"weight/{name}"].append(float(weights[i]))
        # GML2O: whether the learned step passed its guard (logged mean = acceptance rate).
        accepted = getattr(self.engine.aggregator, "last_accepted", None)
        if mode == "train" and accepted is not None:
            self._metrics[mode]["gml2o/accepted"].append(float(accepted))

    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        """TRL's optimizer, plus the aggregator's own parameters when it learns some
        (uncertainty weighting's log-variances), without weight decay."""
        return add_aggregator_parameters(super().create_optimizer(*args, **kwargs), self.engine)

    # ----------------------------------------------------------------------- checkpoints
    def training_info(self) -> dict[str, Any]:
        return {
            "trainer": type(self).__name__,
            "objectives": list(self.objectives),
            "betas": dict(zip(self.objectives, self.betas.tolist())),
            "aggregator": self.args.aggregator,
            "preference_concentration": self.args.preference_concentration,
            "preference_sampling": self.args.preference_sampling,
            # How a response is scored: what anyone re-computing this model's rewards needs
            # (align.rewards.reward_settings reads them). share_prompt gives the same scores.
            "length_normalize": self.args.length_normalize,
            "max_length": self.args.max_length or 1024,
            "max_prompt_length": self.args.max_prompt_length,
        }
