"""AFT-conv with what its kernel derives, built once while the kernel gets no gradient, in eager code and under
torch.compile.

A compiled graph cannot consult a cache: its checks read storage addresses and version counters, which the compiler
does not trace, and a graph break at every block measured slower than rebuilding the weights in the graph. So
compiled inference calls the same Python as one opaque operator, ``torch.ops.aft_vit.conv2d_reusing_kernel`` (or
``conv2d_channel_major``): the compiler knows its output's shape, and the operator, run eagerly, finds the cache
through the parameter objects it is given (:func:`~aft_vit.layers.cache.derived_cache`), the same objects on every
call. The operators have no backward: compiled training with a frozen kernel and trained projections derives the
weights in the graph (``AftConv._mix_reusing_kernel``).

Inference without autograd on grids where the products are cheaper than the convolution takes
:func:`aft_conv2d_channel_major`, on the rows of the mixer's channel-major projection; everything else (training
with a frozen kernel, a hook on the projections, autocast, the convolution path) the token-major
:func:`aft_conv2d_reusing_kernel`.
"""
from typing import Callable, List, Optional

import torch

from .band import aft_conv2d_band, band_is_cheaper, conv_band_weights
from .cache import ParameterDerivedCache, derived_cache
from .dense import aft_dense_channel_major, aft_dense_in_chunks
from .functional import aft_conv2d, aft_conv2d_dense, conv_window_weights, dense_is_cheaper, reparameterized_kernel

__all__ = ['aft_conv2d_channel_major', 'aft_conv2d_reusing_kernel']


def aft_conv2d_reusing_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: torch.Tensor,
                              gamma: torch.Tensor, beta: torch.Tensor, eps: float,
                              may_overwrite: Optional[Callable[[], bool]] = None) -> torch.Tensor:
    """:func:`~aft_vit.layers.aft_conv2d` with the effective kernel (:func:`reparameterized_kernel`) and, on grids
    where the dense product is cheaper, its (h, T, T) weights, each built once until ``kernel``, ``gamma`` or
    ``beta`` change. For parameters that get no gradient: the entries are built without autograd. ``may_overwrite``:
    asked only on the dense path (a mixer's checks cost time at every block) whether the product may overwrite k
    (:func:`~aft_vit.layers.dense.aft_dense_in_chunks`), for a mixer's own projections that
    :func:`~aft_vit.layers.dense.can_overwrite` accepts."""
    params = [kernel, gamma, beta]
    cache = derived_cache(kernel)
    height, width = q.shape[1], q.shape[2]
    num_heads, kernel_size = kernel.shape[0], kernel.shape[-1]
    if not dense_is_cheaper(height * width, kernel_size, num_heads):
        return aft_conv2d(q, k, v, _effective_kernel(cache, params, eps), method='conv')
    weights = cache.get(params, ('dense', height, width),
                        lambda: conv_window_weights(_effective_kernel(cache, params, eps), height, width))
    if may_overwrite is not None and may_overwrite():
        batch, num_tokens = q.shape[0], height * width
        out = aft_dense_in_chunks(q.reshape(batch, num_tokens, -1), k.reshape(batch, num_tokens, -1),
                                  v.reshape(batch, num_tokens, -1), weights, overwrite=True)
        return out.view(q.shape)
    return aft_conv2d_dense(q, k, v, weights)


def _effective_kernel(cache: ParameterDerivedCache, params: List[torch.Tensor], eps: float) -> torch.Tensor:
    """:func:`reparameterized_kernel` of ``params`` (kernel, gamma, beta), built once in ``cache``."""
    kernel, gamma, beta = params
    return cache.get(params, ('kernel', eps), lambda: reparameterized_kernel(kernel, gamma, beta, eps))


def aft_conv2d_channel_major(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: torch.Tensor,
                             gamma: torch.Tensor, beta: torch.Tensor, eps: float,
                             overwrite: bool = False) -> torch.Tensor:
    """:func:`aft_conv2d_reusing_kernel` without autograd on channel-major inputs, q, v (C, B, H, W) and
    k (h, B, H, W), on a grid where the dense product is cheaper than the convolution (the mixer checks): the banded
    product where :func:`~aft_vit.layers.band.band_is_cheaper` (batch 1 in aft_conv_tiny's layout at 224 px), else the
    dense one, with their weights built once until the kernel changes. Returns (C, B, H, W). ``overwrite``: k may
    be overwritten (the dense path's exp in place), for the rows of the mixer's own projection."""
    params = [kernel, gamma, beta]
    cache = derived_cache(kernel)
    channels, batch, height, width = q.shape
    num_heads = kernel.shape[0]
    if band_is_cheaper(batch, height, width, kernel.shape[-1], channels // num_heads):
        band = cache.get(params, ('band', height, width),
                         lambda: conv_band_weights(_effective_kernel(cache, params, eps), height, width))
        return aft_conv2d_band(q, k, v, band)
    weights = cache.get(params, ('dense', height, width),
                        lambda: conv_window_weights(_effective_kernel(cache, params, eps), height, width))
    num_tokens = height * width
    out = aft_dense_channel_major(q.reshape(channels, batch, num_tokens), k.reshape(num_heads, batch, num_tokens),
                                  v.reshape(channels, batch, num_tokens), weights, overwrite=overwrite)
    return out.view(q.shape)


# The two operators compiled inference calls, defined on a Library rather than by ``torch.library.custom_op``, whose
# wrappers made a call cost ~40 us more than calling the same Python directly, against 15 to 25 us (warm loops over
# aft_conv_tiny's batch-1 mixing on an Intel Xeon, scratch script: 355 to 365 us through custom_op, 321 to 332 through
# the Library, 297 to 322 direct; a forward makes 12 calls). They serve only calls that record no gradient (compiled
# inference; the mixers derive the weights in the graph otherwise), and their registered backward raises: a Library
# operator without one would pass no gradient, silently.
_LIBRARY = torch.library.Library('aft_vit', 'FRAGMENT')
_REUSE_SCHEMA = '(Tensor q, Tensor k, Tensor v, Tensor kernel, Tensor gamma, Tensor beta, float eps) -> Tensor'


def _conv2d_reusing_kernel_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: torch.Tensor,
                              gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """``aft_vit::conv2d_reusing_kernel``: a new contiguous tensor in ``v``'s dtype, as its fake says."""
    return aft_conv2d_reusing_kernel(q, k, v, kernel, gamma, beta, eps).to(v.dtype).contiguous()


def _conv2d_channel_major_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: torch.Tensor,
                             gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """``aft_vit::conv2d_channel_major``: k is read only (a graph's inputs stay as they are), the output is a new
    contiguous tensor in ``v``'s dtype, as its fake says."""
    return aft_conv2d_channel_major(q, k, v, kernel, gamma, beta, eps).to(v.dtype).contiguous()


def _reuse_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: torch.Tensor,
                gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    return q.new_empty(q.shape, dtype=v.dtype)


def _no_backward(ctx, grad: torch.Tensor):
    raise RuntimeError('aft_vit: the operators that reuse a kernel\'s derived weights have no backward; the mixers '
                       'call them only while nothing records gradients. Call aft_vit.layers.aft_conv2d for a '
                       'differentiable product.')


def _define_operator(name: str, kernel: Callable[..., torch.Tensor]) -> None:
    """``aft_vit::<name>`` with the reuse schema, ``kernel`` for every device, the shared fake, and a backward that
    says it has none (silently no gradient otherwise)."""
    _LIBRARY.define(name + _REUSE_SCHEMA)
    _LIBRARY.impl(name, kernel, 'CompositeExplicitAutograd')
    torch.library.register_fake(f'aft_vit::{name}', _reuse_fake, lib=_LIBRARY)
    torch.library.register_autograd(f'aft_vit::{name}', _no_backward, lib=_LIBRARY)


_define_operator('conv2d_reusing_kernel', _conv2d_reusing_kernel_op)
_define_operator('conv2d_channel_major', _conv2d_channel_major_op)
