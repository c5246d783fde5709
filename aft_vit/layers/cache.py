"""Caches: tensors derived from parameters, valid until one of those parameters changes, and tensors that depend
on a grid alone, built once per grid."""
import functools
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .dense import _autocast_off

__all__ = ['ParameterDerivedCache', 'derived_cache', 'grid_constant']


class ParameterDerivedCache:
    """Tensors computed from parameters (AFT-conv's dense window weights, AFT-full's exp-space bias), rebuilt only
    when those change.

    A parameter changes by an in-place update (an optimizer step, ``load_state_dict``, an EMA update: its
    version counter moves) or by being replaced (``.to()``, ``.half()``, assigning ``.data``: its storage
    moves). The cache holds a detached view of each parameter it was built from, so the old storage stays
    alive and no new tensor can reuse its address; equal address and version then mean unchanged values.
    Writes through ``param.data`` bypass version counters: call :meth:`clear` after those.

    Not module state: mixers find theirs with :func:`derived_cache`, so nothing reaches the state dict.
    """

    def __init__(self) -> None:
        self._sources: Optional[List[Tuple[torch.Tensor, int]]] = None
        self._entries: Dict[Hashable, torch.Tensor] = {}

    def clear(self) -> None:
        self._sources = None
        self._entries = {}

    def _unchanged(self, params: Sequence[torch.Tensor]) -> bool:
        sources = self._sources
        if sources is None or len(sources) != len(params):
            return False
        for p, (held, version) in zip(params, sources):  # a loop: a generator in all() cost more than the checks
            if (p._version != version or p.data_ptr() != held.data_ptr() or p.dtype != held.dtype
                    or p.device != held.device or p.shape != held.shape):
                return False
        return True

    def get(self, params: Sequence[torch.Tensor], key: Hashable, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The tensor stored under ``key`` if ``params`` are unchanged since it was built, else ``build()``'s.

        ``build`` runs without autograd and outside inference mode, so its result may be saved for backward
        by a later step that only needs gradients of other inputs, and outside autocast, so the entry is in the
        parameters' own precision whichever call built it.
        """
        if not self._unchanged(params):
            self._entries = {}
            self._sources = [(p.detach(), p._version) for p in params]
        if key not in self._entries:
            with torch.inference_mode(False), torch.no_grad(), _autocast_off(params[0].device.type):
                self._entries[key] = build()
        return self._entries[key]


_CACHES = WeakIdKeyDictionary()


def derived_cache(owner: torch.Tensor) -> ParameterDerivedCache:
    """The cache of what is derived from ``owner`` (a mixer's first parameter) and the parameters beside it.

    Kept beside the parameter object, not in the module, so that code given only the parameters finds it:
    under torch.compile a mixer hands them to an opaque operator (:mod:`aft_vit.layers.reuse`), which receives
    the same parameter objects on every call. It lives as long as the parameter: a module's copies (deepcopy,
    pickle, ``load_state_dict`` into another model) have parameters of their own and start empty.
    """
    cache = _CACHES.get(owner)
    if cache is None:
        cache = _CACHES[owner] = ParameterDerivedCache()
    return cache


def grid_constant(build: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``build``, a tensor that depends on its hashable arguments alone (a grid's sizes, a dtype, a device), run
    once per arguments (the last 64 kept) for eager code. Built outside inference mode and autograd, so that
    autograd may save it for backward when a later training step reuses it."""
    @functools.lru_cache(maxsize=64)
    @functools.wraps(build)
    def cached(*args):
        with torch.inference_mode(False), torch.no_grad():
            return build(*args)
    return cached
