"""Trainers (TRL ``DPOTrainer`` subclasses, each beside its config dataclass).

* :class:`ARMTrainer` — GenARM: one autoregressive reward model per objective;
* :class:`PARMTrainer` — PARM: one α-conditioned ARM (PBLoRA) for all objectives;
* :class:`PreferenceDPOTrainer` — Panacea-style DPO of a policy with an SVD-LoRA / PBLoRA adapter.
"""

from align.trainers.arm import ARMConfig, ARMTrainer
from align.trainers.base import MultiObjectivePreferenceTrainer
from align.trainers.config import MultiObjectivePreferenceConfig
from align.trainers.dpo import PreferenceDPOConfig, PreferenceDPOTrainer
from align.trainers.parm import PARMConfig, PARMTrainer

__all__ = [
    "ARMConfig",
    "ARMTrainer",
    "MultiObjectivePreferenceConfig",
    "MultiObjectivePreferenceTrainer",
    "PARMConfig",
    "PARMTrainer",
    "PreferenceDPOConfig",
    "PreferenceDPOTrainer",
]
