"""Config logic every align trainer's dataclass shares, whatever TRL config it extends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def keep_checkpointing_default(config: Any) -> None:
    """TRL turns activation checkpointing on by default, under the name transformers 5.23
    deprecated (``gradient_checkpointing``; it warns on every config). Call before the TRL
    ``__post_init__`` with ``gradient_checkpointing`` declared ``None`` by default: TRL's default
    is kept under the new name, and a user who sets the old name still gets transformers'
    advice."""
    if getattr(config, "activation_checkpointing", False) is None:
        if config.gradient_checkpointing is None:
            config.activation_checkpointing = True
    elif config.gradient_checkpointing is None:  # transformers before the rename
        config.gradient_checkpointing = True


@dataclass
class AlignTrainingDefaults:
    """Config mixin (before the TRL config in the bases): the old checkpointing name declared
    ``None`` by default and resolved by :func:`keep_checkpointing_default`, and DDP told that
    every trainable parameter takes part in every step.

    transformers asks DDP to search for unused parameters whenever the model is not a bare
    ``PreTrainedModel`` (a PEFT model never is): an extra autograd traversal every step, and a
    warning that it found none. Every trainable parameter of align's adapters is on the path of
    every loss, so the search is off unless a recipe sets ``ddp_find_unused_parameters: true``
    (e.g. for a LoRA on a module its loss never reaches)."""

    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "The former name of activation_checkpointing (on by default, as in TRL)."
        },
    )

    def __post_init__(self) -> None:
        keep_checkpointing_default(self)
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = False
        super().__post_init__()


def add_aggregator_parameters(optimizer: Any, engine: Any) -> Any:
    """Add the multi-gradient method's own learnable parameters (uncertainty weighting's
    log-variances) to a trainer's optimizer, without weight decay; returns the optimizer."""
    extra = [p for p in engine.aggregator.parameters() if p.requires_grad] if engine else []
    if extra and not any(
        p is q for group in optimizer.param_groups for p in group["params"] for q in extra
    ):
        optimizer.add_param_group({"params": extra, "weight_decay": 0.0})
    return optimizer
