"""AFT token mixers: ``nn.Module`` wrappers of the functional operators, used in place of attention.

Each mixer maps (B, N, C) tokens to (B, N, C) and is told the patch grid
``feat_size`` = (H, W) of the current input, so the same block works at any
resolution. Queries, keys and values come from one fused ``qkv`` linear layer
(as in timm's Attention), ordered q, k, v.
"""
from dataclasses import dataclass
from functools import partial
from typing import Callable, ClassVar, Dict, List, Tuple, Type

import torch
import torch.fx
import torch.nn as nn
from timm.layers import resample_abs_pos_embed, trunc_normal_

from .cache import derived_cache
from .functional import (
    CACHED_WEIGHTS_LIMIT, aft_conv2d, aft_full, aft_full_dense, aft_simple, cached_local_window_mask_2d,
    dense_is_cheaper, full_bias_weights, is_exporting, local_window_mask_2d, reparameterized_kernel)
from .dense import aft_dense_in_chunks, overwritable, records_gradients
from .reuse import aft_conv2d_channel_major, aft_conv2d_reusing_kernel

__all__ = ['AftMixer', 'AftFull', 'AftLocal', 'AftSimple', 'AftConv', 'MixerArgs', 'MIXERS', 'get_mixer']

MIXERS: Dict[str, Type['AftMixer']] = {}  # filled by each AftMixer subclass's ``name``


@dataclass(frozen=True)
class MixerArgs:
    """The model's arguments that a mixer may use; each mixer's :meth:`AftMixer.layer` picks its own."""
    grid_size: Tuple[int, int]
    num_prefix_tokens: int
    num_heads: int
    kernel_size: int
    bias_rank: int
    local_window: int
    qkv_bias: bool
    proj_bias: bool


class AftMixer(nn.Module):
    """Base of the AFT token mixers: the fused ``qkv`` projection (q, v of ``dim`` channels, k of ``key_dim``),
    the output projection, and what the model asks of a mixer instead of branching on its kind.

    A subclass registers itself under a name (``class AftConv(AftMixer, name='conv')``), which is the model's
    ``mixer`` argument, and declares:

    * ``default_class_token``: whether the model gets a class token and a learned position embedding by default;
    * ``no_weight_decay_params``: its parameters exempt from weight decay;
    * ``grid_params``: its per-token parameters laid out like ``pos_embed`` (prefix rows, then the grid), which
      the checkpoint filter resamples to another grid as it does ``pos_embed``;
    * ``caches_when_compiled``: whether torch.compile's graphs reach its cache (through an opaque operator);
    * :meth:`layer`, :meth:`set_grid_size` and :meth:`describe`.
    """
    name: ClassVar[str] = ''
    default_class_token: ClassVar[bool] = True
    no_weight_decay_params: ClassVar[Tuple[str, ...]] = ()
    grid_params: ClassVar[Tuple[str, ...]] = ()
    caches_when_compiled: ClassVar[bool] = False

    def __init_subclass__(cls, name: str = '', **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if name:
            if name in MIXERS:
                raise ValueError(f'AFT mixer name {name!r} is taken by {MIXERS[name].__name__}')
            cls.name = name
            MIXERS[name] = cls

    def __init__(
            self,
            dim: int,
            key_dim: int,
            qkv_bias: bool = True,
            proj_bias: bool = True,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.dim = dim
        self.key_dim = key_dim
        self.qkv = nn.Linear(dim, dim * 2 + key_dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def layer(cls, args: MixerArgs) -> Callable[..., 'AftMixer']:
        """This mixer's constructor for the blocks, taking ``(dim, proj_drop=, device=, dtype=)``."""
        return partial(cls, qkv_bias=args.qkv_bias, proj_bias=args.proj_bias)

    def set_grid_size(self, grid_size: Tuple[int, int]) -> None:
        """Follow a new nominal patch grid (``set_input_size``): nothing to do without per-token parameters."""

    def describe(self) -> str:
        """One line for ``aft-vit models``."""
        raise NotImplementedError

    @torch.jit.unused
    def _may_cache(self) -> bool:
        """No tracer records the forward: a graph must hold what it derives, for any grid. Under torch.compile
        only through an opaque operator (``caches_when_compiled``: AFT-conv's, :mod:`.reuse`): a lookup in the
        graph would break it at every block, which measured slower than recomputing (benchmarks/README.md)."""
        if torch.compiler.is_compiling() and not self.caches_when_compiled:
            return False
        return not (torch.fx._symbolic_trace.is_fx_symbolic_tracing() or is_exporting())

    @torch.jit.unused
    def _params_are_constant(self, params: List[torch.Tensor]) -> bool:
        """No gradient flows to ``params`` (inference, frozen weights) and :meth:`_may_cache`: then what is
        derived from them alone can be reused until they change."""
        return self._may_cache() and not (torch.is_grad_enabled() and any(p.requires_grad for p in params))

    @torch.jit.unused
    def _may_overwrite(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether the product may overwrite k (:func:`~aft_vit.layers.dense.can_overwrite`): not while a forward hook
        (on ``qkv`` or global) may have kept ``qkv``'s output, which would then change under it. Called only where
        :meth:`_may_cache` holds (and not compiling), so only the tensors are checked."""
        hooked = self.qkv._forward_hooks or nn.modules.module._global_forward_hooks
        return not hooked and overwritable(q, k, v)

    def _project_in(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(x).split([self.dim, self.key_dim, self.dim], dim=-1)
        return q, k, v

    def _project_out(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_drop(self.proj(x))


def get_mixer(name: str) -> Type[AftMixer]:
    """The mixer class registered as ``name``, or a ValueError listing the known ones."""
    if name not in MIXERS:
        raise ValueError(f'Unknown AFT mixer {name!r}, expected one of {tuple(MIXERS)}')
    return MIXERS[name]


class AftSimple(AftMixer, name='simple'):
    """AFT-simple: no position bias, O(T C). ``feat_size`` is accepted and unused."""

    def __init__(self, dim: int, **kwargs) -> None:
        super().__init__(dim, dim, **kwargs)

    def describe(self) -> str:
        return 'AFT-simple (no position bias)'

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        q, k, v = self._project_in(x)
        return self._project_out(aft_simple(q, k, v))


class AftFull(AftMixer, name='full'):
    """AFT-full with the factorized bias ``w = U V^T`` of rank ``bias_rank`` (paper: 128 on ImageNet).

    ``pos_bias_u`` / ``pos_bias_v`` hold one row per token: the prefix (class) tokens
    first, then the patch grid in row-major order, like timm's ``pos_embed``. At another
    grid size both are resampled as timm resamples ``pos_embed`` (bicubic over the grid,
    prefix rows kept), which keeps the bias a function of 2-D position.
    """
    no_weight_decay_params = ('pos_bias_u', 'pos_bias_v')
    grid_params = ('pos_bias_u', 'pos_bias_v')

    def __init__(
            self,
            dim: int,
            grid_size: Tuple[int, int],
            num_prefix_tokens: int = 1,
            bias_rank: int = 128,
            device=None,
            dtype=None,
            **kwargs,
    ) -> None:
        super().__init__(dim, dim, device=device, dtype=dtype, **kwargs)
        dd = {'device': device, 'dtype': dtype}
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.num_prefix_tokens = num_prefix_tokens
        num_tokens = num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        self.pos_bias_u = nn.Parameter(torch.empty(num_tokens, bias_rank, **dd))
        self.pos_bias_v = nn.Parameter(torch.empty(num_tokens, bias_rank, **dd))
        self.init_weights()

    @classmethod
    def layer(cls, args: MixerArgs) -> Callable[..., AftMixer]:
        return partial(super().layer(args), grid_size=args.grid_size, num_prefix_tokens=args.num_prefix_tokens,
                       bias_rank=args.bias_rank)

    def describe(self) -> str:
        return f'AFT-full (bias rank {self.pos_bias_u.shape[1]})'

    def init_weights(self) -> None:
        """Factors start small (std .02, as timm's pos_embed), so w ~ 0 and the mixer starts near AFT-simple."""
        trunc_normal_(self.pos_bias_u, std=.02)
        trunc_normal_(self.pos_bias_v, std=.02)

    def _resampled(self, factor: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        return resample_abs_pos_embed(
            factor.unsqueeze(0),
            new_size=[feat_size[0], feat_size[1]],
            old_size=[self.grid_size[0], self.grid_size[1]],
            num_prefix_tokens=self.num_prefix_tokens,
        ).squeeze(0)

    def set_grid_size(self, grid_size: Tuple[int, int]) -> None:
        """Resample the bias factors in place for a new patch grid."""
        grid_size = (int(grid_size[0]), int(grid_size[1]))
        if grid_size == self.grid_size:
            return
        for name in self.grid_params:
            old = getattr(self, name)
            setattr(self, name, nn.Parameter(self._resampled(old.detach(), grid_size), requires_grad=old.requires_grad))
        self.grid_size = grid_size

    def position_bias(self, feat_size: Tuple[int, int]) -> torch.Tensor:
        """The (T, T) bias for a grid of ``feat_size`` patches."""
        u, v = self.pos_bias_u, self.pos_bias_v
        if feat_size[0] != self.grid_size[0] or feat_size[1] != self.grid_size[1]:
            u, v = self._resampled(u, feat_size), self._resampled(v, feat_size)
        return self._restrict(u @ v.t(), feat_size)

    def _restrict(self, bias: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        """Where the bias applies: everywhere for AFT-full (AFT-local overrides)."""
        return bias

    def _bias_params(self) -> List[torch.Tensor]:
        """The parameters the bias is computed from."""
        return [self.pos_bias_u, self.pos_bias_v]

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        q, k, v = self._project_in(x)
        if not torch.jit.is_scripting() and self._reuses_bias(x.shape[1]):
            return self._project_out(self._mix_reusing_bias(q, k, v, feat_size))
        return self._project_out(aft_full(q, k, v, self.position_bias(feat_size)))

    @torch.jit.unused
    def _reuses_bias(self, num_tokens: int) -> bool:
        """Whether to keep the exp-space bias while it is unchanged (:meth:`AftMixer._params_are_constant`): not
        above ``CACHED_WEIGHTS_LIMIT`` (T > 2048 tokens: 896 px at patch 16, not 512 px), where a kept (T, T)
        bias per block would cost more memory than rebuilding it on every call costs time."""
        return self._params_are_constant(self._bias_params()) and num_tokens * num_tokens <= CACHED_WEIGHTS_LIMIT

    @torch.jit.unused
    def _mix_reusing_bias(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          feat_size: Tuple[int, int]) -> torch.Tensor:
        """:func:`aft_full` with the exp-space bias of each grid built once: the rank-r product, the window (for
        AFT-local) and the exp are the same on every call until ``pos_bias_u`` / ``pos_bias_v`` change."""
        grid = (int(feat_size[0]), int(feat_size[1]))
        weights = derived_cache(self.pos_bias_u).get(
            self._bias_params(), grid, lambda: full_bias_weights(self.position_bias(grid)))
        if self._may_overwrite(q, k, v):  # q, k, v are this call's own projections
            return aft_dense_in_chunks(q, k, v, weights, overwrite=True)
        return aft_full_dense(q, k, v, weights)


class AftLocal(AftFull, name='local'):
    """AFT-local over the 2-D patch grid: AFT-full's factorized bias kept inside a ``window`` x ``window``
    square around each patch and 0 (not -inf) outside, so every token still sees every other.
    Prefix (class) tokens are inside every window (see :func:`local_window_mask_2d`). Not the 1-D
    :func:`~aft_vit.layers.aft_local` operator, whose window is a distance along the token sequence.
    """

    def __init__(self, dim: int, grid_size: Tuple[int, int], window: int = 7, **kwargs) -> None:
        """``window``: side of the square patch window (odd); other arguments as :class:`AftFull`."""
        if window < 1 or window % 2 != 1:
            raise ValueError(f'AftLocal: window must be a positive odd int (a centred square), got {window}')
        super().__init__(dim, grid_size, **kwargs)
        self.window = window

    @classmethod
    def layer(cls, args: MixerArgs) -> Callable[..., AftMixer]:
        return partial(super().layer(args), window=args.local_window)

    def describe(self) -> str:
        return f'AFT-local (bias rank {self.pos_bias_u.shape[1]}, window {self.window})'

    def _restrict(self, bias: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        if not torch.jit.is_scripting() and self._may_cache():
            inside = cached_local_window_mask_2d(
                int(feat_size[0]), int(feat_size[1]), self.window, self.num_prefix_tokens, bias.device)
        else:
            inside = local_window_mask_2d([feat_size[0], feat_size[1]], self.window, self.num_prefix_tokens,
                                          bias.device)
        return bias * inside


class AftConv(AftMixer, name='conv'):
    """AFT-conv: ``num_heads`` heads, one key channel per head, a learned s x s kernel per head.

    The kernel is re-parameterized per head as ``gamma * (w - mean(w)) / std(w) + beta``
    (paper Sec. 3.4) with gamma = beta = 0 at init, so the mixer starts as AFT-simple.
    The raw kernel ``w`` starts as N(0, 1) (the paper leaves it open; its scale is
    normalized away, so only its shape matters); ``eps`` keeps the std division finite.
    Fully convolutional: no class token, no position embedding (the model pools by average).
    The raw kernel is exempt from weight decay: decay would only shrink it towards ``eps``.
    """
    default_class_token = False
    no_weight_decay_params = ('kernel',)
    caches_when_compiled = True

    def __init__(
            self,
            dim: int,
            num_heads: int = 32,
            kernel_size: int = 11,
            eps: float = 1e-5,
            device=None,
            dtype=None,
            **kwargs,
    ) -> None:
        if dim % num_heads != 0:
            raise ValueError(f'AftConv: dim={dim} must be divisible by num_heads={num_heads}')
        if kernel_size < 1 or kernel_size % 2 != 1:
            raise ValueError(f'AftConv: kernel_size must be a positive odd int, got {kernel_size}')
        super().__init__(dim, num_heads, device=device, dtype=dtype, **kwargs)
        dd = {'device': device, 'dtype': dtype}
        self.num_heads = num_heads
        self.kernel_size = kernel_size
        self.eps = eps
        self.kernel = nn.Parameter(torch.empty(num_heads, kernel_size, kernel_size, **dd))
        self.kernel_gamma = nn.Parameter(torch.empty(num_heads, **dd))
        self.kernel_beta = nn.Parameter(torch.empty(num_heads, **dd))
        self.init_weights()

    @classmethod
    def layer(cls, args: MixerArgs) -> Callable[..., AftMixer]:
        return partial(super().layer(args), num_heads=args.num_heads, kernel_size=args.kernel_size)

    def describe(self) -> str:
        return f'AFT-conv ({self.num_heads} heads, kernel {self.kernel_size})'

    def init_weights(self) -> None:
        nn.init.normal_(self.kernel)
        nn.init.zeros_(self.kernel_gamma)
        nn.init.zeros_(self.kernel_beta)

    def position_kernel(self) -> torch.Tensor:
        """The effective (h, s, s) bias kernel after the per-head re-parameterization."""
        return reparameterized_kernel(self.kernel, self.kernel_gamma, self.kernel_beta, self.eps)

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        if not torch.jit.is_scripting() and self._mixes_channel_major(x, feat_size):
            return self._forward_channel_major(x, feat_size)
        batch = x.shape[0]
        q, k, v = self._project_in(x.reshape(batch, feat_size[0], feat_size[1], -1))
        if not torch.jit.is_scripting() and self._params_are_constant(self._kernel_params()):
            x = self._mix_reusing_kernel(q, k, v)
        else:
            x = aft_conv2d(q, k, v, self.position_kernel())
        return self._project_out(x.reshape(batch, -1, self.dim))

    def _kernel_params(self) -> List[torch.Tensor]:
        """The parameters the effective kernel is computed from."""
        return [self.kernel, self.kernel_gamma, self.kernel_beta]

    @torch.jit.unused
    def _mixes_channel_major(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> bool:
        """Whether to take :meth:`_forward_channel_major`: CPU inference (nothing records gradients) in float32 or
        float64 without autocast; ``qkv`` a plain ``nn.Linear`` without hooks, as that path computes it from its
        weight without calling it (a wrapped or adapted layer, a quantized one, a hook that keeps its output: the
        module is called, token-major); and a grid where the dense or banded product is cheaper than the
        convolution (:func:`dense_is_cheaper`: 224 px, not 896), whose token-last passes gain from channel-major
        rows; the convolution path is token-major."""
        if not self._may_cache() or x.device.type != 'cpu' or x.dtype not in (torch.float32, torch.float64):
            return False
        if torch.is_autocast_enabled('cpu'):
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        if (type(self.qkv) is not nn.Linear or self.qkv._forward_hooks or self.qkv._forward_pre_hooks
                or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks):
            return False
        return dense_is_cheaper(feat_size[0] * feat_size[1], self.kernel_size, self.num_heads)

    @torch.jit.unused
    def _forward_channel_major(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        """:meth:`forward` with the qkv projection computed transposed, as (2 C + h, B T) rows: q, k, v are then
        (C, B, H, W) and (h, B, H, W) views, the products' stacked inputs and gated outputs move runs of tokens
        instead of one value per head, and the output projection reads the (C, B T) result as a transposed matrix,
        with no copy. The same weights and sums as the token-major path: the model's output agrees to float
        rounding (tests/test_channel_major.py)."""
        batch, (height, width) = x.shape[0], feat_size
        qkv = self._project_in_channel_major(x)
        q, k, v = qkv.view(-1, batch, height, width).split([self.dim, self.key_dim, self.dim], dim=0)
        if torch.compiler.is_compiling():
            out = torch.ops.aft_vit.conv2d_channel_major(q, k, v, *self._kernel_params(), self.eps)
        else:  # k: rows of this call's own projection
            out = aft_conv2d_channel_major(q, k, v, *self._kernel_params(), self.eps, overwrite=True)
        return self._project_out(out.view(self.dim, -1).t()).view(batch, -1, self.dim)

    @torch.jit.unused
    def _project_in_channel_major(self, x: torch.Tensor) -> torch.Tensor:
        """``self.qkv(x)`` for (B, T, C) tokens, transposed: (2 C + h, B T) rows, computed as such (one product)."""
        tokens = x.reshape(-1, self.dim)
        if self.qkv.bias is None:
            return torch.mm(self.qkv.weight, tokens.t())
        return torch.addmm(self.qkv.bias.unsqueeze(1), self.qkv.weight, tokens.t())

    @torch.jit.unused
    def _mix_reusing_kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """:func:`aft_conv2d` with the effective kernel, and the dense weights of each grid, built once
        (:func:`aft_conv2d_reusing_kernel`; under torch.compile through its operator, which has no backward: a
        compiled graph whose q, k, v record gradients, a frozen kernel with trained projections, derives the weights
        in the graph instead, through :func:`aft_conv2d`'s differentiable path)."""
        if torch.compiler.is_compiling():
            if records_gradients(q, k, v):
                return aft_conv2d(q, k, v, self.position_kernel())
            return torch.ops.aft_vit.conv2d_reusing_kernel(q, k, v, *self._kernel_params(), self.eps)
        return aft_conv2d_reusing_kernel(q, k, v, *self._kernel_params(), self.eps,
                                         may_overwrite=lambda: self._may_overwrite(q, k, v))
