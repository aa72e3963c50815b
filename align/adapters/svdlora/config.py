"""SVD-LoRA configuration (Panacea)."""

from __future__ import annotations

from dataclasses import dataclass, field

from align.adapters.config import PreferenceAdapterConfig

SVDLORA = "SVDLORA"


@dataclass
class SVDLoraConfig(PreferenceAdapterConfig):
    """``ΔW(α) = (lora_alpha / r) · U diag(σ_1..σ_r, s·α_1..s·α_m) V``.

    Panacea's parameterisation: r learnable singular values shared by all preferences plus one
    singular direction per objective whose value is ``s·α_i``, with one learnable scalar s.
    U, V ~ N(0, init_std) and σ = s = 0 at start, so ΔW starts at 0.
    """

    @classmethod
    def with_rank(cls, rank: int, **options) -> SVDLoraConfig:
        """Rank ``rank``, as for a policy trained by preference DPO."""
        return cls(r=rank, **options)

    r: int = field(
        default=8, metadata={"help": "Preference-agnostic singular values (rank r + m)."}
    )
    lora_alpha: float = field(default=8, metadata={"help": "Scaling numerator: lora_alpha / r."})
    init_std: float = field(default=0.02, metadata={"help": "Std of the U and V initialisation."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SVDLORA
        if self.r < 0:
            raise ValueError(f"SVDLoraConfig needs r >= 0, got {self.r}")
        if self.init_std <= 0:
            raise ValueError(f"SVDLoraConfig needs init_std > 0, got {self.init_std}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / max(self.r, 1)
