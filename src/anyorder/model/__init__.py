from .transformer import ModelConfig, Transformer
from .backbones import build_backbone
