"""Multi-objective GRPO: TRL's ``GRPOTrainer`` with one reward per objective and α per prompt.

TRL's loop is kept whole — generation (transformers or vLLM), the GRPO loss, DeepSpeed, logging,
checkpointing. This trainer changes three things around it:

* **α per prompt group.** Before a generation round, every prompt group (the G completions of
  one prompt) gets its α: the fixed ``preference``, or Dirichlet(p·1) drawn with a generator
  seeded by ``(seed, global_step, group)`` — the same on every process and on a resumed run, no
  sampler state to save. A policy with a preference adapter (SVD-LoRA / PBLoRA) has the rows'
  α set on it while it generates and while each micro-batch's log-probs are computed (per row,
  kept beside the batch as it is shuffled and split), so one adapter learns every trade-off.
* **Per-objective advantages.** From TRL's gathered ``(N, m)`` rewards, the advantage of each
  objective i is its part of TRL's combined advantage, ``A = Σ_i α_i A_i`` exactly:
  ``normalize_then_sum`` (GDPO, the default here): ``A_i = (z_i − μ) / (s + ε)`` with ``z_i`` the
  group z-score of reward i and μ, s the batch mean and std of ``Σ α z``; ``sum_then_normalize``
  (TRL's default): ``A_i = (r_i − mean_group r_i) / (std_group(Σ α r) + ε)`` (``scale_rewards``
  as in TRL). A reward of None is NaN; it counts as 0 in the sums and a completion with no
  reward at all gets advantage 0 — TRL's rule.
* **Modes.** ``scalarized`` hands TRL one advantage per completion: ``Σ α_i A_i`` (linear: with a
  fixed α, exactly TRL's ``reward_weights=α``), or with ``scalarization: tchebycheff`` /
  ``smooth_tchebycheff`` the negated scalarization (``align.mograd``'s) of the negated group
  z-scores, ``−S_α(−z)``, group-normalised as a reward. ``per_objective`` computes one GRPO
  loss per objective (TRL's loss with ``A_i``; one forward shared by the m losses) and hands
  the m losses to :class:`~align.mograd.engine.MultiObjectiveEngine`: any aggregator, loss-level
  (one backward) or gradient-level (MGDA, PCGrad, CAGrad, Nash-MTL, Gram-L2O, ...: m backwards),
  under DDP and DeepSpeed as for the offline trainers. Its α is one per generation round (the
  methods take one α per step). With ``aggregator: linear`` it equals ``scalarized`` (the GRPO
  loss is linear in the advantage on-policy; with ``num_iterations > 1`` clipping makes it
  differ).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import nanstd

from align.preference import Preference, check_objectives, sample_preferences
from align.trainers.checkpoints import AtomicCheckpoints
from align.trainers.options import AlignTrainingDefaults, add_aggregator_parameters
from align.trainers.registry import register_trainer

MODES = ("scalarized", "per_objective")
SCALARIZATIONS = ("linear", "tchebycheff", "smooth_tchebycheff")
AGGREGATIONS = ("normalize_then_sum", "sum_then_normalize")
POLICY_ADAPTERS = ("lora", "svdlora", "pblora", "none")
_EPS = 1e-4  # TRL's


@dataclass
class MOGRPOConfig(AlignTrainingDefaults, GRPOConfig):
    """TRL's ``GRPOConfig`` plus what multi-objective RL needs (α, rewards, mode, adapter)."""

    objectives: list[str] | None = field(
        default=None,
        metadata={"help": "Objective names in α order; default: the rewards' keys, in order."},
    )
    rewards: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Objective → reward spec: a scorer name (positivity, brevity, ...), "
            "reward-model:PATH, arm:PATH (an ARM adapter) or parm:PATH (a PARM at the "
            "objective's vertex)."
        },
    )
    combined_reward: str | None = field(
        default=None,
        metadata={
            "help": "parm:PATH — one PARM scored at each completion's own α as the one reward "
            "the advantage comes from (scalarized mode); `rewards`, if given, are then only "
            "logged. The objectives are the PARM's."
        },
    )
    preference: Any = field(
        default=None,
        metadata={
            "help": "A fixed α (list in objective order, or objective → weight); None: "
            "α ~ Dirichlet(preference_concentration) per prompt group."
        },
    )
    preference_concentration: float = field(
        default=1.0, metadata={"help": "p of the Dirichlet(p·1) α is drawn from."}
    )
    mode: str = field(
        default="scalarized",
        metadata={
            "help": "'scalarized' (one advantage) or 'per_objective' (m losses → aggregator)."
        },
    )
    scalarization: str = field(
        default="linear",
        metadata={"help": "scalarized mode: linear, tchebycheff or smooth_tchebycheff."},
    )
    scalarization_options: dict[str, Any] | None = field(
        default=None, metadata={"help": "Keyword options of the scalarization (e.g. mu)."}
    )
    aggregator: str = field(
        default="linear",
        metadata={"help": "per_objective mode: an align.mograd method (mgda, pcgrad, stch, ...)."},
    )
    aggregator_options: dict[str, Any] | None = field(
        default=None, metadata={"help": "Keyword options of the aggregator."}
    )
    aggregator_accumulation: str = field(
        default="micro",
        metadata={"help": "Gradient-level aggregators: 'micro' or 'full' (needed under ZeRO)."},
    )
    allow_preference_blind_aggregator: bool = field(
        default=False,
        metadata={"help": "Allow an aggregator that ignores α with a preference-adapter policy."},
    )
    multi_objective_aggregation: str = field(
        default="normalize_then_sum",
        metadata={
            "help": "TRL's: 'normalize_then_sum' (GDPO: each reward z-scored in its group "
            "first; the default here, as rewards on different scales are the rule) or "
            "'sum_then_normalize' (TRL's default)."
        },
    )
    policy_adapter: str = field(
        default="lora",
        metadata={
            "help": "Adapter added to a plain model: lora, svdlora or pblora (conditioned on "
            "α: one policy for every trade-off), or none (train the model as given)."
        },
    )
    adapter_rank: int = field(default=8, metadata={"help": "LoRA r / SVD-LoRA r / PBLoRA r1."})
    preference_rank: int = field(default=4, metadata={"help": "PBLoRA's r2 (the α path)."})
    lora_alpha: float = field(default=16, metadata={"help": "Adapter scaling numerator."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Adapter dropout."})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules the adapter wraps; default: q/k/v/o."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.scalarization not in SCALARIZATIONS:
            raise ValueError(
                f"scalarization must be one of {SCALARIZATIONS}, got {self.scalarization!r}"
            )
        if self.multi_objective_aggregation not in AGGREGATIONS:
            raise ValueError(
                f"multi_objective_aggregation must be one of {AGGREGATIONS}, "
                f"got {self.multi_objective_aggregation!r}"
            )
        if self.policy_adapter not in POLICY_ADAPTERS:
            raise ValueError(
                f"policy_adapter must be one of {POLICY_ADAPTERS}, got {self.policy_adapter!r}"
            )
        if not (
            isinstance(self.preference_concentration, int | float)
            and math.isfinite(self.preference_concentration)
            and self.preference_concentration > 0
        ):
            raise ValueError(
                f"preference_concentration must be a finite number > 0, "
                f"got {self.preference_concentration!r}"
            )
        if self.objectives is not None:
            self.objectives = list(check_objectives(self.objectives))
        if self.reward_weights is not None:
            raise ValueError(
                "reward_weights is TRL's static weighting; with mo_grpo the weights are α: set "
                "`preference` (fixed) or leave it unset (drawn per prompt group)"
            )


def _policy_adapter_config(args: MOGRPOConfig, objectives: Sequence[str], model: Any) -> Any:
    from peft import LoraConfig

    from align.adapters import PBLoraConfig, SVDLoraConfig
    from align.trainers.arm import attention_targets

    targets = args.target_modules or [*attention_targets(model), "o_proj"]
    targets = [
        t for t in dict.fromkeys(targets) if any(n.endswith(t) for n, _ in model.named_modules())
    ]
    common = dict(target_modules=targets, lora_alpha=args.lora_alpha, task_type="CAUSAL_LM")
    if args.policy_adapter == "lora":
        return LoraConfig(r=args.adapter_rank, lora_dropout=args.lora_dropout, **common)
    if args.policy_adapter == "svdlora":
        return SVDLoraConfig(objectives=list(objectives), r=args.adapter_rank, **common)
    return PBLoraConfig(
        objectives=list(objectives),
        r1=args.adapter_rank,
        r2=args.preference_rank,
        lora_dropout=args.lora_dropout,
        **common,
    )


def objective_advantages(
    rewards: torch.Tensor,
    alpha: torch.Tensor,
    num_generations: int,
    aggregation: str = "normalize_then_sum",
    scale_rewards: str = "group",
) -> torch.Tensor:
    """Per-objective advantages ``(N, m)`` whose α-weighted sum is TRL's combined advantage.

    ``rewards`` ``(N, m)`` (NaN: no reward), ``alpha`` ``(N, m)`` (constant within each group of
    ``num_generations`` consecutive rows). See the module notes for the formulas.
    """
    n, m = rewards.shape
    unscorable = torch.isnan(rewards).all(dim=1)
    alpha = alpha.to(rewards)
    if aggregation == "sum_then_normalize":
        parts = torch.nan_to_num(rewards, nan=0.0)
        parts[unscorable] = torch.nan
        group_mean = torch.nanmean(parts.view(-1, num_generations, m), dim=1)
        combined = (parts * alpha).sum(dim=1)
        if scale_rewards == "batch":
            scale = nanstd(combined).expand(n) if n > 1 else torch.zeros(n)
        elif num_generations > 1:
            scale = nanstd(combined.view(-1, num_generations), dim=1)
            scale = scale.repeat_interleave(num_generations)
        else:
            scale = torch.zeros(n)
        centred = parts - group_mean.repeat_interleave(num_generations, dim=0)
        if scale_rewards != "none":
            centred = centred / (scale.to(centred) + _EPS)[:, None]
    elif aggregation == "normalize_then_sum":
        z = torch.nan_to_num(group_z_scores(rewards, num_generations), nan=0.0)
        z[unscorable] = torch.nan
        combined = (z * alpha).sum(dim=1)
        scale = nanstd(combined) if n > 1 else torch.zeros(())
        centred = (z - torch.nanmean(combined)) / (scale + _EPS)
    else:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    return torch.nan_to_num(centred, nan=0.0)


def group_normalize(
    values: torch.Tensor, num_generations: int, scale_rewards: str = "group"
) -> torch.Tensor:
    """One reward per completion → its GRPO advantage, as TRL normalises a combined reward."""
    grouped = values.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = nanstd(values).expand_as(values)
    else:
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
    advantages = values - mean
    if scale_rewards != "none":
        advantages = advantages / (std + _EPS)
    return torch.nan_to_num(advantages, nan=0.0)


def group_z_scores(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Each reward z-scored within its group (NaN kept), ``(N, m)``."""
    n, m = rewards.shape
    grouped = rewards.view(-1, num_generations, m)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    std = nanstd(grouped, dim=1, keepdim=True)
    return ((grouped - mean) / (std + _EPS)).view(n, m)


@register_trainer("mo_grpo", "grpo")
class MOGRPOTrainer(AtomicCheckpoints, GRPOTrainer):
    """GRPO against one reward per objective; scalarised, per-objective (any align.mograd
    aggregator) or, with a preference adapter, one α-conditioned policy for every trade-off.

    ``reward_funcs``: objective → spec or callable (see :mod:`align.rewards.online`), a list in
    ``args.objectives`` order, or None to use ``args.rewards``. Everything else is TRL's.
    """

    config_class = MOGRPOConfig
    data_kind = "prompts"
    _tag_names = ["trl", "grpo", "align"]
    _name = "MO-GRPO"

    def __init__(
        self,
        model: Any,
        reward_funcs: Mapping[str, Any] | Sequence[Any] | None = None,
        args: MOGRPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        peft_config: Any = None,
        callbacks: Sequence[Any] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        **kwargs: Any,
    ) -> None:
        from align.rewards.online import objective_rewards

        if args is None:
            raise ValueError("MOGRPOTrainer needs args=MOGRPOConfig(...)")
        specs = reward_funcs if reward_funcs is not None else args.rewards
        base = model if isinstance(model, str) else getattr(model.config, "_name_or_path", None)
        combined = None
        if args.combined_reward is not None:
            from align.rewards.online import CombinedPARMReward

            if args.mode != "scalarized":
                raise ValueError(
                    "combined_reward is one reward already weighted by α: it needs mode: "
                    "scalarized (per-objective losses need one reward per objective)"
                )
            combined = CombinedPARMReward(args.combined_reward, base or None, device=args.device)
        if not specs and combined is None:
            raise ValueError(
                "mo_grpo needs one reward per objective: `rewards: {objective: spec}` in the "
                "recipe's args (a scorer name, reward-model:PATH, arm:PATH or parm:PATH), or "
                "`combined_reward: parm:PATH`"
            )
        objectives = args.objectives or (list(specs) if isinstance(specs, Mapping) else None)
        if objectives is None and combined is not None:
            objectives = list(combined.objectives)
        if objectives is None:
            raise ValueError("rewards given as a list need `objectives` (their names, in order)")
        self.objectives = tuple(check_objectives(objectives))
        if combined is not None:
            from align.preference import require_same_objectives

            require_same_objectives(
                combined.objectives, self.objectives, f"the PARM {args.combined_reward}", "mo_grpo"
            )
        self.fixed_preference = (
            None
            if args.preference is None
            else Preference.coerce(args.preference, self.objectives).weights.float()
        )
        functions = (
            objective_rewards(
                self.objectives,
                specs,
                base=base or None,
                tokenizer=processing_class,
                max_new_tokens=args.max_completion_length,
                device=args.device,
            )
            if specs
            else []
        )
        self.reward_sources = {
            name: getattr(f, "source", repr(f)) for name, f in zip(self.objectives, functions)
        }
        self.combined = combined
        if combined is not None:
            combined.trainer = self
            self.reward_sources["combined"] = args.combined_reward
            functions = [*functions, combined]
        plain = peft_config is None and not isinstance(model, PeftModel)
        if plain and args.policy_adapter != "none":
            peft_config = _policy_adapter_config(args, self.objectives, model)
        self._row_preference: torch.Tensor | None = None
        self._shared_forward: list | None = None  # per_objective: the forward the m losses share
        self._last_rewards: torch.Tensor | None = None
        super().__init__(
            model=model,
            reward_funcs=functions,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=list(callbacks or []),
            optimizers=optimizers,
            peft_config=peft_config,
            **kwargs,
        )
        from align.adapters.base import PreferenceTuner

        unwrapped = self.accelerator.unwrap_model(self.model)
        self.conditioned = isinstance(getattr(unwrapped, "base_model", None), PreferenceTuner)
        if self.conditioned:
            from align.adapters import objectives_of
            from align.preference import require_same_objectives

            require_same_objectives(
                objectives_of(unwrapped), self.objectives, "the policy's adapter", "the rewards"
            )
            if args.use_vllm:
                raise ValueError(
                    "a preference-adapter policy generates with α set per row, which vLLM's "
                    "engine cannot do: set use_vllm: false (or train a LoRA policy per α)"
                )
        if not self.conditioned and self.fixed_preference is None:
            import warnings

            warnings.warn(
                "the policy has no preference adapter, so it cannot see the α drawn per prompt "
                "group: it learns one trade-off, averaged over Dirichlet draws (random "
                "weighting); set `preference` for a fixed α, or policy_adapter: svdlora / pblora "
                "for one policy for every α",
                stacklevel=2,
            )
        self.scalarizer = None
        if args.mode == "scalarized" and args.scalarization != "linear":
            from align.mograd.registry import get_aggregator

            options = dict(args.scalarization_options or {})
            for key, stateful in (("ideal", "running"), ("nadir", "warmup")):
                if options.get(key) == stateful:
                    raise ValueError(
                        f"scalarized mode scores each completion on its own; {key}: {stateful} "
                        f"needs a loss history: use mode: per_objective with aggregator "
                        f"{args.scalarization}"
                    )
            self.scalarizer = get_aggregator(args.scalarization, **options)
        self.engine = None
        if args.mode == "per_objective":
            from align.mograd.engine import MultiObjectiveEngine

            if self.conditioned:
                from align.mograd.registry import require_preference_aware

                require_preference_aware(
                    args.aggregator, type(self).__name__, args.allow_preference_blind_aggregator
                )
            import inspect

            from align.mograd.registry import aggregator_class

            options = dict(args.aggregator_options or {})
            if "num_objectives" in inspect.signature(aggregator_class(args.aggregator)).parameters:
                options.setdefault("num_objectives", len(self.objectives))  # UW's log-variances
            self.engine = MultiObjectiveEngine(
                args.aggregator,
                [p for p in self.model.parameters() if p.requires_grad],
                accelerator=self.accelerator,
                accumulation=args.aggregator_accumulation,
                **options,
            )

    # ------------------------------------------------------------------------ preference
    def group_preferences(self, groups: int, first_group: int = 0) -> torch.Tensor:
        """α of groups ``first_group ..`` of this generation round, ``(groups, m)``."""
        m = len(self.objectives)
        if self.fixed_preference is not None:
            return self.fixed_preference.expand(groups, m).clone()
        step = self.state.global_step
        if self.args.mode == "per_objective":  # one α per round: the methods take one α
            rng = np.random.default_rng([self.args.seed, step])
            alpha = sample_preferences(m, None, self.args.preference_concentration, rng)
            return alpha.float().expand(groups, m).clone()
        rows = [
            sample_preferences(
                m,
                None,
                self.args.preference_concentration,
                np.random.default_rng([self.args.seed, step, first_group + g]),
            )
            for g in range(groups)
        ]
        return torch.stack(rows).float()

    def _set_policy_preference(self, rows: torch.Tensor) -> None:
        from align.adapters import set_preference

        set_preference(self.accelerator.unwrap_model(self.model), Preference(rows, self.objectives))

    # ---------------------------------------------------------------------- generation
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards = rewards  # gathered over processes: (N, m)
        return rewards

    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        generations = self.num_generations if mode == "train" else self.num_generations_eval
        local, world = len(inputs), self.accelerator.num_processes
        total = local * world
        if total % generations:
            raise ValueError(f"{total} completions do not make groups of {generations}")
        alpha = self.group_preferences(total // generations).repeat_interleave(generations, 0)
        rank = self.accelerator.process_index
        mine = alpha[rank * local : (rank + 1) * local]
        self._row_preference = mine
        if self.conditioned:
            self._set_policy_preference(mine)
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._row_preference = None
        rewards = self._last_rewards.float().cpu()
        parts = None  # per-objective advantages (N, m), when the mode has them
        if self.combined is not None:
            # The PARM already weighed the objectives at each row's α: its one reward is
            # normalised in its group like TRL's combined reward; the others are only logged.
            advantages = group_normalize(rewards[:, -1], generations, self.scale_rewards)
            rewards = rewards[:, :-1]
        elif self.scalarizer is not None:
            z = torch.nan_to_num(group_z_scores(rewards, generations), nan=0.0)
            combined = torch.stack(
                [-self.scalarizer(-z[row], alpha[row]).detach() for row in range(total)]
            )
            combined[torch.isnan(rewards).all(dim=1)] = torch.nan
            advantages = group_normalize(combined, generations, self.scale_rewards)
        else:
            parts = objective_advantages(
                rewards,
                alpha,
                generations,
                self.args.multi_objective_aggregation,
                self.scale_rewards,
            )
            advantages = (parts * alpha).sum(dim=1)
        device = output["advantages"].device
        output["advantages"] = advantages[rank * local : (rank + 1) * local].to(device)
        output["preference"] = mine.to(device)
        if self.engine is not None:
            output["objective_advantages"] = parts[rank * local : (rank + 1) * local].to(device)
        self._log_preferences(mode, rewards, alpha, advantages)
        return output

    def _log_preferences(self, mode, rewards, alpha, advantages) -> None:
        metrics = self._metrics[mode]
        # TRL logged its static-weight sum; the reward of a completion is α·r at its own α
        # (with a combined PARM reward and no objective rewards, TRL's: the PARM's).
        if metrics.get("reward") and rewards.shape[1] == alpha.shape[1]:
            weighted = torch.nansum(rewards * alpha, dim=1)
            weighted[torch.isnan(rewards).all(dim=1)] = torch.nan
            metrics["reward"][-1] = torch.nanmean(weighted).item()
            metrics["reward_std"][-1] = nanstd(weighted).item()
        for index, name in enumerate(self.objectives):
            metrics[f"alpha/{name}/mean"].append(alpha[:, index].mean().item())
            metrics[f"alpha/{name}/std"].append(alpha[:, index].std(unbiased=False).item())
        if self.engine is not None and self.engine.last_weights is not None and mode == "train":
            for index, name in enumerate(self.objectives):
                metrics[f"weight/{name}"].append(float(self.engine.last_weights[index]))
        logged = self._logs["advantages"]  # TRL's completions table: the advantages used
        if len(logged) >= len(advantages):
            for _ in range(len(advantages)):
                logged.pop()
            logged.extend(advantages.tolist())

    # ---------------------------------------------------------------------------- loss
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, *args, **kw):
        if self._shared_forward is not None and self._shared_forward:
            return self._shared_forward[0]
        rows = self._row_preference
        reference = self.ref_model is not None and model is self.ref_model
        if not self.conditioned or rows is None or reference:
            result = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, *args, **kw
            )
        else:
            result = self._conditioned_log_probs(
                model, input_ids, attention_mask, rows, *args, **kw
            )
        if self._shared_forward is not None:
            self._shared_forward.append(result)
        return result

    def _conditioned_log_probs(self, model, input_ids, attention_mask, rows, *args, **kw):
        """TRL's chunked log-probs with each chunk's rows' α set on the policy."""
        size = kw.pop("batch_size", None) or input_ids.shape[0]
        logits_to_keep, *rest = args
        if rest:
            raise TypeError("pass the options of _get_per_token_logps_and_entropies by keyword")
        parts = []
        for start in range(0, input_ids.shape[0], size):
            stop = start + size
            self._set_policy_preference(rows[start:stop])
            parts.append(
                super()._get_per_token_logps_and_entropies(
                    model, input_ids[start:stop], attention_mask[start:stop], logits_to_keep, **kw
                )
            )
        logps = torch.cat([p[0] for p in parts])
        entropies = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
        aux = None if parts[0][2] is None else torch.stack([p[2] for p in parts]).mean()
        return logps, entropies, aux

    def _compute_loss(self, model, inputs):
        self._row_preference = inputs.get("preference")
        try:
            if self.engine is None:
                return super()._compute_loss(model, inputs)
            return self._per_objective_loss(model, inputs)
        finally:
            self._row_preference = None

    def _per_objective_loss(self, model, inputs):
        """TRL's GRPO loss once per objective (advantage ``A_i``) on one shared forward, the m
        losses aggregated by the engine."""
        mode = "train" if self.model.training else "eval"
        parts = inputs["objective_advantages"]
        before = {key: len(values) for key, values in self._metrics[mode].items()}
        self._shared_forward = []
        try:
            losses = torch.stack(
                [
                    super(MOGRPOTrainer, self)._compute_loss(
                        model, {**inputs, "advantages": parts[:, index]}
                    )
                    for index in range(parts.shape[1])
                ]
            )
        finally:
            self._shared_forward = None
        # TRL logged each of the m calls: keep one entry per micro-batch (their mean).
        for key, values in self._metrics[mode].items():
            extra = values[before.get(key, 0) :]
            if len(extra) > 1:
                del values[before.get(key, 0) :]
                values.append(sum(extra) / len(extra))
        for index, name in enumerate(self.objectives):
            value = self.accelerator.gather(losses[index].detach().reshape(1)).mean()
            self._metrics[mode][f"loss/{name}"].append(float(value))
        if mode != "train":
            return (losses * inputs["preference"][0].to(losses)).sum()
        return self.engine(losses, inputs["preference"][0].to(losses))

    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        """TRL's optimizer, plus the aggregator's own parameters when it learns some."""
        return add_aggregator_parameters(super().create_optimizer(*args, **kwargs), self.engine)

    # ----------------------------------------------------------------------- checkpoints
    def training_info(self) -> dict[str, Any]:
        return {
            "trainer": type(self).__name__,
            "objectives": list(self.objectives),
            "rewards": dict(self.reward_sources),
            "mode": self.args.mode,
            "scalarization": self.args.scalarization,
            "aggregator": self.args.aggregator,
            "multi_objective_aggregation": self.args.multi_objective_aggregation,
            "preference": None
            if self.fixed_preference is None
            else dict(zip(self.objectives, self.fixed_preference.tolist())),
            "preference_concentration": self.args.preference_concentration,
            "conditioned": self.conditioned,
            "combined_reward": self.args.combined_reward,
        }
