from align.adapters.svdlora.config import SVDLORA, SVDLoraConfig
from align.adapters.svdlora.layer import Linear, SVDLoraCore, SVDLoraLayer
from align.adapters.svdlora.model import SVDLoraModel

__all__ = ["SVDLORA", "Linear", "SVDLoraConfig", "SVDLoraCore", "SVDLoraLayer", "SVDLoraModel"]
