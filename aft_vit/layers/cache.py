"""A cache for tensors derived from parameters, valid until one of those parameters changes."""
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from .dense import _autocast_off

__all__ = ['ParameterDerivedCache']


class ParameterDerivedCache:
    """Tensors computed from parameters (AFT-conv's dense window weights, AFT-full's exp-space bias), rebuilt only
    when those change.

    A parameter changes by an in-place update (an optimizer step, ``load_state_dict``, an EMA update: its
    version counter moves) or by being replaced (``.to()``, ``.half()``, assigning ``.data``: its storage
    moves). The cache holds a detached view of each parameter it was built from, so the old storage stays
    alive and no new tensor can reuse its address; equal address and version then mean unchanged values.
    Writes through ``param.data`` bypass version counters: call :meth:`clear` after those.

    Not module state: it is a plain attribute, so nothing reaches the state dict, and copies and pickles
    (``copy.deepcopy`` for EMA, ``torch.save(model)``) start empty.
    """

    def __init__(self) -> None:
        self._sources: Optional[List[Tuple[torch.Tensor, int]]] = None
        self._entries: Dict[Hashable, torch.Tensor] = {}

    def clear(self) -> None:
        self._sources = None
        self._entries = {}

    def _unchanged(self, params: Sequence[torch.Tensor]) -> bool:
        if self._sources is None or len(self._sources) != len(params):
            return False
        return all(
            p.data_ptr() == held.data_ptr() and p._version == version and p.dtype == held.dtype
            and p.device == held.device and p.shape == held.shape
            for p, (held, version) in zip(params, self._sources))

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

    def __deepcopy__(self, memo: dict) -> 'ParameterDerivedCache':
        return type(self)()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
