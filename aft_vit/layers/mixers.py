"""AFT token mixers: ``nn.Module`` wrappers of the functional operators, used in place of attention.

Each mixer maps (B, N, C) tokens to (B, N, C) and is told the patch grid
``feat_size`` = (H, W) of the current input, so the same block works at any
resolution. Queries, keys and values come from one fused ``qkv`` linear layer
(as in timm's Attention), ordered q, k, v.
"""
from typing import Tuple

import torch
import torch.fx
import torch.nn as nn
from timm.layers import resample_abs_pos_embed, trunc_normal_

from .cache import ParameterDerivedCache
from .functional import (
    aft_conv2d, aft_conv2d_dense, aft_full, aft_simple, conv_window_weights, dense_is_cheaper, local_window_mask_2d)

__all__ = ['AftFull', 'AftLocal', 'AftSimple', 'AftConv']


class AftSimple(nn.Module):
    """AFT-simple: no position bias, O(T C). ``feat_size`` is accepted and unused."""

    def __init__(
            self,
            dim: int,
            qkv_bias: bool = True,
            proj_bias: bool = True,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = aft_simple(q, k, v)
        return self.proj_drop(self.proj(x))


class AftFull(nn.Module):
    """AFT-full with the factorized bias ``w = U V^T`` of rank ``bias_rank`` (paper: 128 on ImageNet).

    ``pos_bias_u`` / ``pos_bias_v`` hold one row per token: the prefix (class) tokens
    first, then the patch grid in row-major order, like timm's ``pos_embed``. At another
    grid size both are resampled as timm resamples ``pos_embed`` (bicubic over the grid,
    prefix rows kept), which keeps the bias a function of 2-D position.
    """

    def __init__(
            self,
            dim: int,
            grid_size: Tuple[int, int],
            num_prefix_tokens: int = 1,
            bias_rank: int = 128,
            qkv_bias: bool = True,
            proj_bias: bool = True,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.num_prefix_tokens = num_prefix_tokens
        num_tokens = num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.pos_bias_u = nn.Parameter(torch.empty(num_tokens, bias_rank, **dd))
        self.pos_bias_v = nn.Parameter(torch.empty(num_tokens, bias_rank, **dd))
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.init_weights()

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
        """Resample the bias factors in place for a new patch grid (used by ``set_input_size``)."""
        grid_size = (int(grid_size[0]), int(grid_size[1]))
        if grid_size == self.grid_size:
            return
        for name in ('pos_bias_u', 'pos_bias_v'):
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

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = aft_full(q, k, v, self.position_bias(feat_size))
        return self.proj_drop(self.proj(x))


class AftLocal(AftFull):
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

    def _restrict(self, bias: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        inside = local_window_mask_2d([feat_size[0], feat_size[1]], self.window, self.num_prefix_tokens, bias.device)
        return bias * inside.to(bias.dtype)


class AftConv(nn.Module):
    """AFT-conv: ``num_heads`` heads, one key channel per head, a learned s x s kernel per head.

    The kernel is re-parameterized per head as ``gamma * (w - mean(w)) / std(w) + beta``
    (paper Sec. 3.4) with gamma = beta = 0 at init, so the mixer starts as AFT-simple.
    The raw kernel ``w`` starts as N(0, 1) (the paper leaves it open; its scale is
    normalized away, so only its shape matters); ``eps`` keeps the std division finite.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 32,
            kernel_size: int = 11,
            qkv_bias: bool = True,
            proj_bias: bool = True,
            proj_drop: float = 0.,
            eps: float = 1e-5,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f'AftConv: dim={dim} must be divisible by num_heads={num_heads}')
        if kernel_size < 1 or kernel_size % 2 != 1:
            raise ValueError(f'AftConv: kernel_size must be a positive odd int, got {kernel_size}')
        dd = {'device': device, 'dtype': dtype}
        self.dim = dim
        self.num_heads = num_heads
        self.kernel_size = kernel_size
        self.eps = eps
        self.qkv = nn.Linear(dim, dim * 2 + num_heads, bias=qkv_bias, **dd)
        self.kernel = nn.Parameter(torch.empty(num_heads, kernel_size, kernel_size, **dd))
        self.kernel_gamma = nn.Parameter(torch.empty(num_heads, **dd))
        self.kernel_beta = nn.Parameter(torch.empty(num_heads, **dd))
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self._derived = ParameterDerivedCache()
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.kernel)
        nn.init.zeros_(self.kernel_gamma)
        nn.init.zeros_(self.kernel_beta)

    def position_kernel(self) -> torch.Tensor:
        """The effective (h, s, s) bias kernel after the per-head re-parameterization."""
        var, mean = torch.var_mean(self.kernel, dim=[1, 2], unbiased=False, keepdim=True)
        normalized = (self.kernel - mean) * torch.rsqrt(var + self.eps)
        return self.kernel_gamma[:, None, None] * normalized + self.kernel_beta[:, None, None]

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        batch = x.shape[0]
        qkv = self.qkv(x).reshape(batch, feat_size[0], feat_size[1], -1)
        q, k, v = qkv.split([self.dim, self.num_heads, self.dim], dim=-1)
        if not torch.jit.is_scripting() and self._kernel_is_constant():
            x = self._mix_reusing_kernel(q, k, v)
        else:
            x = aft_conv2d(q, k, v, self.position_kernel())
        x = x.reshape(batch, -1, self.dim)
        return self.proj_drop(self.proj(x))

    def _kernel_params(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The parameters the effective kernel is computed from."""
        return self.kernel, self.kernel_gamma, self.kernel_beta

    @torch.jit.unused
    def _kernel_is_constant(self) -> bool:
        """No gradient flows to the kernel (inference, frozen weights) and no tracer records the forward:
        then what is derived from the kernel can be reused until the kernel's parameters change. Under
        torch.compile the graph derives it on every call instead: a cache lookup would break the graph at
        every block, which measured slower than recomputing (benchmarks/README.md)."""
        if torch.compiler.is_compiling() or torch.fx._symbolic_trace.is_fx_symbolic_tracing():
            return False
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in self._kernel_params()))

    @torch.jit.unused
    def _mix_reusing_kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """:func:`aft_conv2d` with the effective kernel, and the dense weights of each grid, built once."""
        height, width = q.shape[1], q.shape[2]
        params = self._kernel_params()
        kernel = self._derived.get(params, 'kernel', self.position_kernel)
        if not dense_is_cheaper(height * width, self.kernel_size, self.num_heads):
            return aft_conv2d(q, k, v, kernel, method='conv')
        weights = self._derived.get(params, ('dense', height, width), lambda: conv_window_weights(kernel, height, width))
        return aft_conv2d_dense(q, k, v, weights)
