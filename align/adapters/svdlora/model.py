"""SVD-LoRA tuner: injects SVD-LoRA layers into a transformers model."""

from __future__ import annotations

from align.adapters.base import PreferenceTuner, register_adapter
from align.adapters.config import QKV_TARGET_MODULES
from align.adapters.svdlora.config import SVDLORA, SVDLoraConfig
from align.adapters.svdlora.layer import Linear, SVDLoraLayer


@register_adapter(SVDLORA)
class SVDLoraModel(PreferenceTuner):
    """``get_peft_model(model, SVDLoraConfig(objectives=[...]))`` builds one of these."""

    config_class = SVDLoraConfig
    prefix = "svdlora_"
    tuner_layer_cls = SVDLoraLayer
    layer_cls = SVDLoraLayer
    linear_cls = Linear
    target_module_mapping = QKV_TARGET_MODULES
