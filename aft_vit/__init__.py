"""aft_vit: Attention Free Transformer (Zhai et al., 2021) vision models as a timm plugin.

``import aft_vit`` registers the ``aft_*`` models, so ``timm.create_model('aft_conv_small')`` works.
"""
from .layers import aft_conv2d, aft_full, aft_local, aft_simple
from .models import AftVisionTransformer

__version__ = '0.1.0'
