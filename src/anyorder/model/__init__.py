from .transformer import ModelConfig, Transformer
