from align.adapters.pblora.config import PBLORA, PBLoraConfig
from align.adapters.pblora.layer import Linear, PBLoraCore, PBLoraLayer
from align.adapters.pblora.model import PBLoraModel

__all__ = ["PBLORA", "Linear", "PBLoraConfig", "PBLoraCore", "PBLoraLayer", "PBLoraModel"]
