"""aft_vit: Attention Free Transformer (Zhai et al., 2021) vision models as a timm plugin.

``import aft_vit`` registers the ``aft_*`` models, so ``timm.create_model('aft_conv_small')`` works.
"""
from . import compat
from .layers import aft_conv2d, aft_full, aft_local, aft_simple
from .models import AftVisionTransformer

compat.apply()

__version__ = '0.1.0'
__all__ = ['aft_conv2d', 'aft_full', 'aft_local', 'aft_simple', 'AftVisionTransformer']
