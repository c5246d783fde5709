"""Readable class names: ImageNet-derived datasets (Imagenette) name their class folders by WordNet id.

timm's ImageNet metadata (``timm.data.ImageNetInfo``) maps those ids to words, so a model trained on
``n01440764/ ...`` folders can say "tench" without a table of our own.
"""
from functools import lru_cache
from typing import Dict, Optional, Sequence

from timm.data import ImageNetInfo


@lru_cache(maxsize=1)
def _imagenet_info() -> ImageNetInfo:
    """timm reads its synset files on construction: once per process is enough (the registry, publish, predict)."""
    return ImageNetInfo()


def imagenet_descriptions(label_names: Optional[Sequence[str]]) -> Optional[Dict[str, str]]:
    """``{wnid: description}`` when every name is an ImageNet-1k WordNet id, else None."""
    if not label_names:
        return None
    info = _imagenet_info()
    known = set(info.label_names())
    if not all(name in known for name in label_names):
        return None
    return {name: info.label_name_to_description(name) for name in label_names}
