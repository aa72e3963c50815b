"""What SVD-LoRA and PBLoRA share: a PEFT tuner layer whose update depends on α.

A preference layer wraps a linear layer (plain or bitsandbytes-quantized) and adds
``scaling · B · core(α) · A · x``, always through the low-rank factors: ``A`` maps the input to
r numbers, ``core(α)`` is a small r×r (or diagonal) map that depends on α, ``B`` maps back. No
dense out×in update is built in the forward pass, only when merging.

α is stored on every layer (per adapter) and stays set until changed: that is what makes it safe
under gradient checkpointing, whose recompute runs after the forward pass has returned. α may be
one vector ``(m,)`` for the whole batch or one row per example ``(B, m)``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils import get_quantization_kwargs, resolve_quantization_backend
from torch import nn

from align.preference import Preference, PreferenceLike
from align.registry import Registry

PREF_KWARG = "pref"


class PreferenceNotSetError(RuntimeError):
    """A preference adapter ran without α: a silent zero would hide a bug, so it is an error."""


class PreferenceLayer(BaseTunerLayer):
    """Tuner-layer mixin: α per adapter, the forward skeleton, merge and unmerge.

    Subclasses name their modules in ``adapter_layer_names`` (the first is the input factor
    ``A``, the second the output factor ``B``, the third the α-dependent core) and implement
    :meth:`_core_apply` (``h -> core(α) h`` on the r-dimensional hidden) and :meth:`core_matrix`.
    """

    other_param_names = ("objectives", "scaling", "dropout")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.quantization_backend = resolve_quantization_backend(
            self.get_base_layer(), get_apply_tensor_subclass=kwargs.get("get_apply_tensor_subclass")
        )
        self.objectives: dict[str, tuple[str, ...]] = {}
        self.scaling: dict[str, float] = {}
        self.dropout = nn.ModuleDict({})
        self._preferences: dict[str, torch.Tensor] = {}  # in the adapter's dtype and device
        self._validated_preferences: dict[str, torch.Tensor] = {}
        self._merged_preferences: dict[str, torch.Tensor] = {}
        # Optional per-row on/off switch for the update (B,), so base-model rows and adapted
        # rows can share one batched forward (guided decoding with PARM = base + adapter).
        self._row_gate: torch.Tensor | None = None
        self._disable_adapters = False
        self.merged_adapters = []
        base = self.get_base_layer()
        if isinstance(base, nn.Linear) or hasattr(base, "in_features"):
            self.in_features, self.out_features = base.in_features, base.out_features
        else:
            raise TypeError(
                f"preference adapters support linear layers only, got {type(base).__name__}"
            )
        self.kwargs = kwargs

    # --- the factors ---------------------------------------------------------------------
    @property
    def _input_factor(self) -> nn.ModuleDict:
        return getattr(self, self.adapter_layer_names[0])

    @property
    def _output_factor(self) -> nn.ModuleDict:
        return getattr(self, self.adapter_layer_names[1])

    @property
    def _core(self) -> nn.ModuleDict:
        return getattr(self, self.adapter_layer_names[2])

    def _core_apply(self, adapter: str, hidden: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """``core(α) h`` for hidden ``(..., r)`` and α ``(m,)``, or ``(B, ..., r)`` and ``(B, m)``."""
        raise NotImplementedError

    def core_matrix(self, adapter: str, alpha: torch.Tensor) -> torch.Tensor:
        """The r×r core at one α (for merging and for checking the forward pass)."""
        raise NotImplementedError

    def _finish_update(
        self, adapter_name: str, config: Any, scaling: float, inference_mode: bool
    ) -> None:
        self.objectives[adapter_name] = tuple(config.objectives)
        self.scaling[adapter_name] = scaling
        self.dropout[adapter_name] = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    # --- α -------------------------------------------------------------------------------
    def set_preference(self, adapter: str, alpha: torch.Tensor | None) -> None:
        """Store α (already validated, shape (m,) or (B, m)) for one adapter; None clears it."""
        if adapter in self.merged_adapters and alpha is not None:
            merged = self._merged_preferences[adapter]
            if alpha.shape != merged.shape or not torch.equal(alpha.to(merged), merged):
                raise RuntimeError(
                    f"adapter {adapter!r} is merged into the base weights at α={merged.tolist()}; "
                    f"unmerge it before changing α"
                )
        if alpha is None:
            self._preferences.pop(adapter, None)
            self._validated_preferences.pop(adapter, None)
            return
        param = next(self._core[adapter].parameters())
        self._preferences[adapter] = alpha.to(device=param.device, dtype=param.dtype)
        # Kept as given (float64): a bf16 copy no longer sums to 1 within the α tolerance.
        self._validated_preferences[adapter] = alpha

    def get_preference(self, adapter: str) -> torch.Tensor | None:
        return self._validated_preferences.get(adapter)

    def _require_preference(self, adapter: str) -> torch.Tensor:
        alpha = self._preferences.get(adapter)
        if alpha is None:
            raise PreferenceNotSetError(
                f"no preference set for adapter {adapter!r} (objectives {self.objectives[adapter]}): "
                f"call align.adapters.set_preference(model, α) or pass pref=α to forward / generate"
            )
        return alpha

    # --- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        result_dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter not in self._input_factor:
                continue
            alpha = self._require_preference(adapter)
            down = self._input_factor[adapter]
            hidden = down(self.dropout[adapter](self._cast_input_dtype(x, down.weight.dtype)))
            if alpha.ndim == 2 and hidden.shape[0] != alpha.shape[0]:
                raise ValueError(
                    f"the preference has {alpha.shape[0]} rows but the input batch has {hidden.shape[0]}; "
                    f"give one α per example (generate(pref=...) expands it for beams and samples)"
                )
            if self._row_gate is not None:  # gate the r-dim hidden: cheaper than the output
                if self._row_gate.shape[0] != hidden.shape[0]:
                    raise ValueError(
                        f"the row gate has {self._row_gate.shape[0]} rows but the batch has {hidden.shape[0]}"
                    )
                hidden = hidden * self._row_gate.reshape(-1, *([1] * (hidden.ndim - 1)))
            up = self._output_factor[adapter].weight
            if alpha.ndim == 1:
                # One α for the batch: fold the r×r core into the output factor (weight-sized
                # work), so the per-token cost is exactly LoRA's two thin matmuls.
                delta = F.linear(hidden, up @ self.core_matrix(adapter, alpha))
            else:
                delta = F.linear(self._core_apply(adapter, hidden, alpha), up)
            result = result + (delta * self.scaling[adapter]).to(result_dtype)
        return result

    # --- merging -------------------------------------------------------------------------
    def get_delta_weight(self, adapter: str, alpha: torch.Tensor | None = None) -> torch.Tensor:
        """The dense out×in update ``scaling · B · core(α) · A`` at one α (default: the set α)."""
        alpha = self._require_preference(adapter) if alpha is None else alpha
        if alpha.ndim != 1:
            raise ValueError("a dense update needs one α, not a batch of them")
        down, up = self._input_factor[adapter].weight, self._output_factor[adapter].weight
        compute = (
            torch.float32
            if down.device.type == "cpu" and down.dtype in (torch.float16, torch.bfloat16)
            else down.dtype
        )
        core = self.core_matrix(adapter, alpha.to(device=down.device, dtype=down.dtype)).to(compute)
        delta = up.to(compute) @ core.to(compute) @ down.to(compute) * self.scaling[adapter]
        return delta.to(down.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self._input_factor:
                continue
            alpha = self._require_preference(adapter)
            if alpha.ndim != 1:
                raise ValueError(
                    f"merging needs one α, but adapter {adapter!r} has a batch of {alpha.shape[0]}"
                )
            weight = self.get_base_weight()
            delta = self.get_delta_weight(adapter, alpha).to(weight.dtype)
            merged = weight.clone() + delta if safe_merge else weight + delta
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging adapter {adapter!r} produced non-finite weights")
            self.set_base_weight(merged)
            self._merged_preferences[adapter] = alpha.clone()
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            alpha = self._merged_preferences.pop(adapter)
            weight = self.get_base_weight()
            self.set_base_weight(weight - self.get_delta_weight(adapter, alpha).to(weight.dtype))


#: The preference-aware tuners (``pblora``, ``svdlora``), each a PEFT tuner with its
#: ``config_class``; :func:`align.adapters.registry.register` hands them to PEFT.
ADAPTERS: Registry = Registry("preference adapter", attribute="adapter_type")


def register_adapter(peft_type: str):
    """Class decorator for a :class:`PreferenceTuner` under its PEFT type name."""
    return ADAPTERS.register(peft_type)


class PreferenceTuner(BaseTuner):
    """Tuner-model base: injects preference layers and routes α to them."""

    layer_cls: type[PreferenceLayer]
    linear_cls: type[nn.Module]

    def _create_and_replace(
        self, config, adapter_name, target, target_name, parent, current_key, **optional_kwargs
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None")
        if isinstance(target, self.layer_cls):
            target.update_layer(adapter_name, config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not (isinstance(base, nn.Linear) or _quantized_linear(base)):
            raise TypeError(
                f"{type(self).__name__} adapts linear layers (plain or bitsandbytes-quantized); "
                f"{current_key} is a {type(base).__name__}"
            )
        new_module = self.linear_cls(target, adapter_name, config, **get_quantization_kwargs(self))
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an additional adapter is not trainable by default
        self._replace_module(parent, target_name, new_module, target)

    def preference_layers(self) -> Iterator[PreferenceLayer]:
        return (module for module in self.model.modules() if isinstance(module, PreferenceLayer))

    def objectives_of(self, adapter: str | None = None) -> tuple[str, ...]:
        adapter = adapter or self.active_adapters[0]
        return tuple(self.peft_config[adapter].objectives)

    def set_preference(
        self, preference: PreferenceLike | None, adapter: str | None = None
    ) -> Preference | None:
        """Set α on every layer of one adapter (default: each active one); None clears it."""
        adapters = [adapter] if adapter else list(self.active_adapters)
        chosen = None
        for name in adapters:
            if name not in self.peft_config:
                raise ValueError(f"no adapter named {name!r}; adapters: {sorted(self.peft_config)}")
            chosen = (
                None
                if preference is None
                else Preference.coerce(preference, self.objectives_of(name))
            )
            tensor = None if chosen is None else chosen.weights
            for layer in self.preference_layers():
                if name in layer.objectives:
                    layer.set_preference(name, tensor)
        return chosen

    def set_row_gate(self, gate: torch.Tensor | None) -> None:
        """Per-row 0/1 switch for the adapter's update, shape (B,); None switches it off."""
        for layer in self.preference_layers():
            if gate is None:
                layer._row_gate = None
                continue
            # Moved once here, not per forward: a per-layer host-to-device copy would sync CUDA.
            weight = next(iter(layer._input_factor.values())).weight
            layer._row_gate = gate.to(device=weight.device, dtype=weight.dtype)

    def get_preference(self, adapter: str | None = None) -> Preference | None:
        adapter = adapter or self.active_adapters[0]
        for layer in self.preference_layers():
            alpha = layer.get_preference(adapter)
            if alpha is not None:
                return Preference(alpha, self.objectives_of(adapter))
        return None

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """``model(..., pref=α)`` / ``model.generate(..., pref=α)``: α for one call only."""
        preference = kwargs.get(PREF_KWARG)
        if preference is None:
            yield
            return
        checkpointing = getattr(self.model, "is_activation_checkpointing", None)
        if checkpointing is None:  # the name before transformers 5
            checkpointing = getattr(self.model, "is_gradient_checkpointing", False)
        if self.model.training and checkpointing and torch.is_grad_enabled():
            # The recompute in backward would run after α is restored, with the wrong α.
            raise RuntimeError(
                "pref= for a single call is unsafe with gradient checkpointing during training; "
                "call set_preference(model, α) before the forward pass instead"
            )
        objectives = self.objectives_of()
        preference = Preference.coerce(preference, objectives)
        if preference.is_batched:
            factor = _generation_expansion(kwargs, getattr(self.model, "generation_config", None))
            if factor > 1:  # generate() repeats each prompt this many times, rows kept together
                preference = Preference(
                    preference.weights.repeat_interleave(factor, dim=0), objectives
                )
        saved = [
            (layer, dict(layer._preferences), dict(layer._validated_preferences))
            for layer in self.preference_layers()
        ]
        try:
            self.set_preference(preference)
            yield
        finally:
            for layer, preferences, validated in saved:
                layer._preferences, layer._validated_preferences = preferences, validated

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        preference: PreferenceLike | None = None,
    ) -> nn.Module:
        """Fold the adapter at one α into the base weights; returns the plain transformers model."""
        if preference is not None:
            self.set_preference(preference)
        return super().merge_and_unload(
            progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )


def _generation_expansion(kwargs: dict[str, Any], model_config: Any = None) -> int:
    """How many rows ``generate`` makes of each prompt: beams for beam search, else samples
    (from the call, else its generation config, else the model's saved generation config)."""
    config = kwargs.get("generation_config") or model_config
    beams = kwargs.get("num_beams", getattr(config, "num_beams", 1) or 1)
    returns = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", 1) or 1)
    return beams if beams > 1 else returns


def _quantized_linear(module: nn.Module) -> bool:
    backend = resolve_quantization_backend(module)
    return backend is not None and backend.layer_type == "linear"
