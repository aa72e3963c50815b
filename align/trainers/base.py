"""What ARM, PARM and preference-DPO training share, on top of TRL's ``DPOTrainer``.

All three read the multi-objective preference schema, score both responses of a pair in one
forward (:mod:`align.trainers.pair_scoring`), turn the scores into one pairwise loss per
objective (:mod:`align.trainers.losses`), and hand the m losses to the multi-gradient core,
whose scalar goes to ``accelerator.backward`` — so gradient accumulation, mixed precision,
clipping, DDP and DeepSpeed stay TRL's and Accelerate's. This module wires those pieces into
TRL's hooks: α per micro-batch (:mod:`align.trainers.sampling`), the loss of a training or
evaluation step, the metrics, and the training record; the config is
:mod:`align.trainers.config`, checkpoints :mod:`align.trainers.checkpoints`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from datasets import Dataset
from peft import PeftModel
from trl import DPOTrainer

from align.mograd.engine import MultiObjectiveEngine
from align.rewards.scoring import ResponseLogProbs
from align.trainers import pair_scoring
from align.trainers.checkpoints import (  # noqa: F401  (re-exported: the tests' names)
    MOGRAD_SHARD_STATE,
    MOGRAD_STATE,
    AtomicCheckpoints,
)
from align.trainers.config import MultiObjectivePreferenceConfig
from align.trainers.data import (
    TOKENIZED_COLUMNS,
    MultiObjectivePreferenceCollator,
    select_objectives,
    tokenize_preference_dataset,
)
from align.trainers.losses import objective_losses as pairwise_objective_losses
from align.trainers.options import add_aggregator_parameters
from align.trainers.pair_scoring import PairScores
from align.trainers.sampling import MicroStepCounter, step_preference

__all__ = ["MultiObjectivePreferenceConfig", "MultiObjectivePreferenceTrainer", "PairScores"]


class MultiObjectivePreferenceTrainer(AtomicCheckpoints, DPOTrainer):
    """Base of :class:`ARMTrainer`, :class:`PARMTrainer` and :class:`PreferenceDPOTrainer`.

    Subclasses say how a pair is scored (:meth:`score_pairs`) and whether α conditions the
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
        #: Which micro-step of the optimizer step the next α draw is.
        self.preference_steps = MicroStepCounter()

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
        return step_preference(
            self.args.seed,
            step,
            self.preference_steps.next(step),
            len(self.objectives),
            pairs,
            concentration=self.args.preference_concentration,
        )

    def set_model_preference(self, model: Any, preference: torch.Tensor) -> None:
        from align.adapters import set_preference

        set_preference(self.accelerator.unwrap_model(model), preference)

    # --------------------------------------------------------------------------- scoring
    def response_log_probs(
        self, model: Any, inputs: Mapping[str, torch.Tensor]
    ) -> ResponseLogProbs:
        """Summed response-token log-probs and token counts of the batch's 2B rows, through
        TRL's fused LM head; with ``share_prompt``, each pair's prompt is read once."""
        return pair_scoring.response_log_probs(
            model,
            self.accelerator.unwrap_model(model),
            inputs,
            share_prompt=self.args.share_prompt,
        )

    def sequence_log_probs(self, model: Any, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Summed (``length_normalize``: mean) response-token log-probs per row (2B,)."""
        return self.response_log_probs(model, inputs).score(self.args.length_normalize)

    def score_pairs(self, model: Any, inputs: Mapping[str, torch.Tensor]) -> PairScores:
        """Both responses' scores and the model's mean token NLL over them (the anchor's)."""
        log_probs = self.response_log_probs(model, inputs)
        scores = log_probs.score(self.args.length_normalize)
        return PairScores(*scores.chunk(2), -log_probs.mean().mean())

    def pair_scores(
        self, model: Any, inputs: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The score of response_0 and of response_1, each (B,); higher means preferred."""
        scores = self.score_pairs(model, inputs)
        return scores.response_0, scores.response_1

    def objective_losses(
        self,
        scores_0: torch.Tensor,
        scores_1: torch.Tensor,
        preferred: torch.Tensor,
        pair_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:func:`align.trainers.losses.objective_losses` with this trainer's β."""
        return pairwise_objective_losses(scores_0, scores_1, preferred, self.betas, pair_weights)

    # ------------------------------------------------------------------------------ loss
    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool):
        mode = "train" if self.model.training else "eval"
        preferred = inputs["preferred"]
        if mode == "train" and self.conditioned and self.args.preference_sampling == "pair":
            loss, nll = self._per_pair_loss(model, inputs, preferred)
        elif mode == "train":
            preference = self.training_preference() if self.conditioned else None
            if preference is not None:
                self.set_model_preference(model, preference)
            *scores, nll = self.score_pairs(model, inputs)
            losses, accuracy, counts = self.objective_losses(*scores, preferred)
            # Stateful methods (DWA's history, FAMO's logits) are observed by the engine, once
            # per optimizer step, on the mean of the step's micro-batch losses.
            features = torch.cat(scores) if self.args.feature_level else None
            loss = self.engine(losses, preference, features=features)
            self._log_objectives(mode, losses, accuracy, counts, preference)
        else:
            loss = self._evaluation_loss(model, inputs, preferred)
        if mode == "train" and self.args.nll_weight:
            loss = loss + self._language_model_anchor(mode, nll)
        if return_outputs:
            return loss, {"logits": torch.zeros(0)}
        return loss

    def _language_model_anchor(self, mode: str, nll: torch.Tensor) -> torch.Tensor:
        """``nll_weight`` × ``nll``, the mean token NLL of this micro-batch's responses under the
        model being trained (:attr:`PairScores.nll`; logged as ``nll``), outside the
        multi-objective aggregation: it belongs to no objective."""
        gathered = self.accelerator.gather(nll.detach().float().reshape(1)).mean()
        self._metrics[mode]["nll"].append(float(gathered))
        return self.args.nll_weight * nll

    def _per_pair_loss(
        self, model: Any, inputs: dict[str, Any], preferred: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``Σ_i (1/n_i) Σ_pairs α_i ℓ_i``: each pair scored at, and weighted by, its own α
        (its two responses share it); in expectation the batch-α loss ``Σ_i α_i L_i``. Returns
        the loss and the responses' mean token NLL."""
        alpha = self.training_preference(pairs=preferred.shape[0])
        self.set_model_preference(model, torch.cat([alpha, alpha]))  # rows: [resp_0; resp_1]
        *scores, nll = self.score_pairs(model, inputs)
        weighted, accuracy, counts = self.objective_losses(*scores, preferred, alpha)
        losses, _, _ = self.objective_losses(*(s.detach() for s in scores), preferred)
        self.engine.last_weights = alpha.mean(dim=0)
        self._log_objectives("train", losses, accuracy, counts, alpha.mean(dim=0))
        return weighted.sum(), nll

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
