"""PBLoRA tuner: injects PBLoRA layers into a transformers model."""

from __future__ import annotations

from align.adapters.base import PreferenceTuner, register_adapter
from align.adapters.config import QKV_TARGET_MODULES
from align.adapters.pblora.config import PBLORA, PBLoraConfig
from align.adapters.pblora.layer import Linear, PBLoraLayer


@register_adapter(PBLORA)
class PBLoraModel(PreferenceTuner):
    """``get_peft_model(model, PBLoraConfig(objectives=[...]))`` builds one of these."""

    config_class = PBLoraConfig
    prefix = "pblora_"
    tuner_layer_cls = PBLoraLayer
    layer_cls = PBLoraLayer
    linear_cls = Linear
    target_module_mapping = QKV_TARGET_MODULES
