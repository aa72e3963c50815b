"""PBLoRA configuration (PARM's preference-aware bilinear LoRA)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from align.adapters.config import PreferenceAdapterConfig

PBLORA = "PBLORA"
THETA_INITS = ("fan_in_m", "parm")


@dataclass
class PBLoraConfig(PreferenceAdapterConfig):
    """``ΔW(α) = s · (B1 W1 A1 + B2 W2(α) A2)`` with ``W2(α) = reshape(Θ α, r2×r2)``.

    The sizes are those of PARM's training run (its ``code/training/run.sh``: r1 = r2 = 4,
    lora_alpha = 8; ``train_pref_arm.py``: dropout 0.05, q/k/v projections), with its scaling
    ``s = lora_alpha / r2`` on both blocks. A and W1 are Kaiming-uniform and B zero, as in PARM's
    ``reset_lora_parameters`` (so the adapter starts as the identity). Θ is not initialised as
    PARM's by default: PARM stores it as W2 (m, r2²) and draws that Kaiming-uniform, U(±1/r2);
    the default ``theta_init="fan_in_m"`` draws Θ (r2², m) Kaiming-uniform, U(±1/√m). Pass
    ``theta_init="parm"`` for PARM's. Folders of PARM's own code: :mod:`.reference`.
    """

    @classmethod
    def with_rank(cls, rank: int, **options) -> PBLoraConfig:
        """Both blocks of rank ``rank`` (r1 = r2), as for a policy trained by preference DPO."""
        return cls(r1=rank, r2=rank, **options)

    r1: int = field(
        default=4, metadata={"help": "Rank of the preference-agnostic block (may be 0)."}
    )
    r2: int = field(default=4, metadata={"help": "Rank of the preference-aware block."})
    lora_alpha: float = field(
        default=8, metadata={"help": "Scaling numerator: s = lora_alpha / r2."}
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter input."})
    theta_init: str = field(
        default="fan_in_m",
        metadata={
            "help": "Initialisation of Θ ((r2², m), the map α → W2(α)), Kaiming-uniform "
            "(a = √5, bound 1/√fan_in) with fan-in m ('fan_in_m': entries up to 1/√m, 0.71 "
            "for m = 2) or with fan-in r2² as in PARM's code, which stores Θ transposed "
            "('parm': entries up to 1/r2, 0.25 for r2 = 4). PARM's makes the α-dependent block "
            "start ~√(r2²/m) times smaller, and at short budgets learn less α-dependence."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PBLORA
        if self.theta_init not in THETA_INITS:
            raise ValueError(
                f"PBLoraConfig.theta_init must be one of {THETA_INITS}, got {self.theta_init!r}"
            )
        if self.r1 < 0 or self.r2 < 1:
            raise ValueError(
                f"PBLoraConfig needs r1 >= 0 and r2 >= 1, got r1={self.r1}, r2={self.r2}"
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder=None, **kwargs):
        """PEFT's, refusing a folder of PARM's reference code: its tensors have other names, so
        PEFT would load it as an identity adapter with a mere missing-keys warning."""
        from align.adapters.pblora.reference import reference_layout, reference_layout_error

        folder = Path(pretrained_model_name_or_path, subfolder or "")
        reason = reference_layout(folder) if folder.is_dir() else None  # hub ids: not checked
        if reason:
            raise reference_layout_error(folder, reason)
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r2
