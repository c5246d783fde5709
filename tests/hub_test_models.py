"""A registry entry whose tag points at a Hub repository, for the registry-tag loading path in test_hub.py.

Imported only by the subprocesses that test_hub.py starts (it must not join the timm suite's model lists).
"""
from timm.models import generate_default_cfgs, register_model

from aft_vit.models.aft_vision_transformer import _conv_cfg, _create_aft_vit

default_cfgs = generate_default_cfgs({
    'aft_conv_tiny_hubtest.olah': _conv_cfg(
        hf_hub_id='aft-vit-test/aft_conv_tiny_hubtest.olah', num_classes=10, input_size=(3, 32, 32), crop_pct=1.0),
})


@register_model
def aft_conv_tiny_hubtest(pretrained: bool = False, **kwargs):
    """aft_conv_tiny's blocks, one of them, at 32 px with 4 px patches."""
    model_args = dict(img_size=32, patch_size=4, embed_dim=192, depth=1, mixer='conv', num_heads=32, kernel_size=11)
    return _create_aft_vit('aft_conv_tiny_hubtest', pretrained=pretrained, **dict(model_args, **kwargs))
