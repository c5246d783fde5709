"""Compatibility fixes for library versions this package installs with, applied on ``import aft_vit``.

Each fix is narrow, keeps the library's intended behaviour, and says which versions it is for.
"""
from PIL import Image


def patch_timm_posterize() -> None:
    """timm's RandAugment asks Pillow to posterize to 0 bits at the top magnitude (e.g. DeiT's
    ``rand-m9-mstd0.5-inc1``, whose magnitude noise reaches 10). Pillow >= 11 rejects 0 bits with a
    ValueError that kills the data loader mid-epoch; older Pillow returned a black image, which is what
    "keep 0 bits" means. This keeps that meaning for 0 (or fewer) bits and leaves every other value to timm.
    """
    from timm.data import auto_augment

    original = auto_augment.posterize
    if getattr(original, 'keeps_zero_bits', False):
        return

    def posterize(img, bits_to_keep, **kwargs):
        if bits_to_keep <= 0:
            return Image.new(img.mode, img.size)  # every bit cleared: black
        return original(img, bits_to_keep, **kwargs)

    posterize.keeps_zero_bits = True
    auto_augment.posterize = posterize
    for name, op in list(auto_augment.NAME_TO_OP.items()):
        if op is original:
            auto_augment.NAME_TO_OP[name] = posterize


def apply() -> None:
    patch_timm_posterize()
