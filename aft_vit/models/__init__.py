"""AFT model definitions; importing this module registers them in timm's model registry."""
from .aft_vision_transformer import AftBlock, AftVisionTransformer, checkpoint_filter_fn

__all__ = ['AftBlock', 'AftVisionTransformer', 'checkpoint_filter_fn']
