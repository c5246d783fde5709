"""AFT operators in functional form (Zhai et al., 2021, arXiv:2105.14103).

Every operator computes, for each token ``t`` and channel ``c``::

    Y[t, c] = sigmoid(Q[t, c]) * sum_t' exp(K[t', c] + w[t, t']) V[t', c]
                               / sum_t' exp(K[t', c] + w[t, t'])

with a different position bias ``w`` (full, local, none, or a 2-D convolution
kernel). Nothing here builds a ``B x T x T x C`` tensor: the exponentials are
factorized as ``exp(K) * exp(w)`` and reduced by a matrix product or a
convolution.

Numerical stability: ``exp`` overflows float32 past 88, so the maximum of ``K``
over tokens (per batch and channel) and of each row of ``w`` is subtracted
before exponentiating (the paper's recipe); both constants cancel between
numerator and denominator. Causal forms use shifts that never look ahead (see
``_causal_bias_weighted_mean`` and ``aft_simple``), so row t depends on tokens
t' <= t alone, bit for bit. Precision limit of any factorized form: when the
dominant ``K + w`` term of a row sits more than ~87 (float32) or ~700 (float64)
below the sum of the two shifts, its factors underflow; the result stays finite
(0 rather than NaN if everything underflows) but loses accuracy. Ordinary
activations are far from that.

All functions are plain tensor code: they run under autocast, on the meta
device, in TorchScript and ``torch.compile``; timm's FX tracer treats them as
leaf calls (their argument checks branch on shapes).
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function
from torch.utils.checkpoint import checkpoint

from .cache import grid_constant
from .dense import aft_dense, is_exporting, positive_weights

__all__ = ['CACHED_WEIGHTS_LIMIT', 'aft_full', 'aft_full_dense', 'aft_simple', 'aft_local', 'aft_conv2d',
           'aft_conv2d_dense', 'cached_local_window_mask_2d', 'conv_window_weights', 'dense_is_cheaper',
           'full_bias_weights', 'is_exporting', 'local_window_mask', 'local_window_mask_2d',
           'reparameterized_kernel']


def _check_qkv(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 3:
        raise ValueError(f'{name}: q must be (B, T, C), got {q.dim()} dims with shape {q.shape}')
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f'{name}: q, k and v must have the same (B, T, C) shape, got q {q.shape}, k {k.shape}, v {v.shape}')


def _check_pos_bias(name: str, q: torch.Tensor, pos_bias: torch.Tensor) -> None:
    num_tokens = q.shape[1]
    if pos_bias.dim() != 2 or pos_bias.shape[0] != num_tokens or pos_bias.shape[1] != num_tokens:
        raise ValueError(
            f'{name}: pos_bias must be (T, T) = ({num_tokens}, {num_tokens}) for T={num_tokens} tokens, '
            f'got {pos_bias.shape}')


def _causal_mask(num_tokens: int, device: torch.device) -> torch.Tensor:
    """True where key t' may be seen from query t, i.e. t' <= t."""
    idx = torch.arange(num_tokens, device=device)
    return idx.unsqueeze(1) >= idx.unsqueeze(0)


def _safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den where a fully underflowed den (only for pathological inputs) gives 0 instead of NaN."""
    return num / torch.where(den > 0, den, torch.ones_like(den))


def _causal_bias_weighted_mean(k: torch.Tensor, v: torch.Tensor, pos_bias: torch.Tensor) -> torch.Tensor:
    """sum_t' exp(k + w) v / sum_t' exp(k + w) over t' <= t only, with shifts that never look ahead.

    A max of K over all tokens would let later tokens change (or underflow) earlier
    outputs. Instead each key token t' is shifted by its own max over channels,
    s[b, t'], and that shift is moved into the bias, whose row max is then taken over
    t' <= t only: exp(K - s) * exp(w + s - max_{t'<=t}(w + s)). Row t of the result
    depends on tokens t' <= t alone, exactly, and every exponent is <= 0. The bias
    becomes per sample, (B, T, T), never (B, T, T, C).
    """
    num_tokens = k.shape[1]
    token_max = k.detach().amax(dim=2)  # (B, T)
    exp_k = torch.exp(k - token_max.unsqueeze(-1))
    visible = _causal_mask(num_tokens, k.device)
    # bring both terms near 0 first (constants per row / per sample), so float32 keeps their precision
    bias = pos_bias - pos_bias.detach().masked_fill(~visible, float('-inf')).amax(dim=1, keepdim=True)
    token_shift = token_max - token_max[:, :1]
    shifted = (bias.unsqueeze(0) + token_shift.unsqueeze(1)).masked_fill(~visible, float('-inf'))  # (B, T, T)
    exp_w = torch.exp(shifted - shifted.detach().amax(dim=2, keepdim=True))
    channels = k.shape[-1]
    both = torch.matmul(exp_w, torch.cat([exp_k * v, exp_k], dim=-1))
    return _safe_divide(both[..., :channels], both[..., channels:])


@register_notrace_function
def aft_full(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pos_bias: torch.Tensor,
        causal: bool = False,
) -> torch.Tensor:
    """AFT-full (paper eq. 2): one learned scalar bias ``pos_bias[t, t']`` per token pair.

    Args:
        q, k, v: (B, T, C) queries, keys, values.
        pos_bias: (T, T) bias, row t = query, column t' = key.
        causal: sum over t' <= t only (autoregressive AFT).

    Returns:
        (B, T, C). Cost O(T^2 C) in one matrix product; memory O(T^2 + B T C).
    """
    _check_qkv('aft_full', q, k, v)
    _check_pos_bias('aft_full', q, pos_bias)
    if causal:
        return torch.sigmoid(q) * _causal_bias_weighted_mean(k, v, pos_bias)
    return aft_dense(q, k, v, full_bias_weights(pos_bias))


def full_bias_weights(pos_bias: torch.Tensor) -> torch.Tensor:
    """The (1, T, T) key-by-query weights ``exp(w[t, t'] - max_t' w[t, t'])`` that :func:`aft_full` multiplies by.

    The paper's shifts: each row's max of w here, K's max over tokens inside the product; both cancel. Every
    channel is its own head (h = C, d = 1) and all share this one matrix. Depends on the bias alone: a mixer in
    inference builds it once and reuses it (:func:`aft_full_dense`).
    """
    exp_w = torch.exp(pos_bias - pos_bias.detach().amax(dim=1, keepdim=True))
    return positive_weights(exp_w).t().unsqueeze(0)


@register_notrace_function
def aft_full_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Non-causal :func:`aft_full` on precomputed ``weights`` from :func:`full_bias_weights`, for mixers that
    reuse them while the bias is unchanged."""
    _check_qkv('aft_full_dense', q, k, v)
    num_tokens = q.shape[1]
    if weights.shape != (1, num_tokens, num_tokens):
        raise ValueError(
            f'aft_full_dense: weights must be (1, T, T) = (1, {num_tokens}, {num_tokens}), got {weights.shape}')
    return aft_dense(q, k, v, weights)


@register_notrace_function
def aft_simple(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool = False,
) -> torch.Tensor:
    """AFT-simple (paper eq. 5): ``sigmoid(Q) * sum_t' softmax_T(K)[t'] * V[t']``, no position bias.

    O(T C) time and memory; no (T, T) tensor is built. The causal form is a running
    log-sum-exp (``logcumsumexp``), stable for keys of any magnitude. Its numerator
    needs positive terms, so V is split as ``(1 + relu(V)) - (1 + relu(-V))``, two
    positive parts whose weighted means subtract back to V's. Keys are shifted by the
    first token's key (always visible, so nothing looks ahead) to keep the log-sums
    small and precise.
    """
    _check_qkv('aft_simple', q, k, v)
    if not causal:
        weights = torch.softmax(k, dim=1)
        return torch.sigmoid(q) * (weights * v).sum(dim=1, keepdim=True)
    k = k - k[:, :1].detach()
    log_den = torch.logcumsumexp(k, dim=1)
    positive = torch.exp(torch.logcumsumexp(k + torch.log1p(torch.relu(v)), dim=1) - log_den)
    negative = torch.exp(torch.logcumsumexp(k + torch.log1p(torch.relu(-v)), dim=1) - log_den)
    return torch.sigmoid(q) * (positive - negative)


def local_window_mask(num_tokens: int, window: int, device: torch.device) -> torch.Tensor:
    """(T, T) bool, True where abs(t - t') < window (the 1-D AFT-local window)."""
    idx = torch.arange(num_tokens, device=device)
    return (idx.unsqueeze(1) - idx.unsqueeze(0)).abs() < window


def local_window_mask_2d(
        grid_size: List[int],
        window: int,
        num_prefix_tokens: int,
        device: torch.device,
) -> torch.Tensor:
    """(T, T) bool window over a 2-D patch grid, T = prefix tokens + H * W.

    Patch (y, x) sees patch (y', x') inside the window when ``|y - y'| <= window // 2``
    and ``|x - x'| <= window // 2`` (a centred window x window square, as AFT-conv's
    kernel). Prefix (class) tokens are inside every window, both as query and as key:
    they have no position on the grid, so their learned bias always applies.
    """
    height, width = grid_size[0], grid_size[1]
    ys = torch.arange(height, device=device).repeat_interleave(width)
    xs = torch.arange(width, device=device).repeat(height)
    radius = window // 2
    inside = ((ys.unsqueeze(1) - ys.unsqueeze(0)).abs() <= radius) & ((xs.unsqueeze(1) - xs.unsqueeze(0)).abs() <= radius)
    if num_prefix_tokens > 0:
        inside = F.pad(inside, (num_prefix_tokens, 0, num_prefix_tokens, 0), value=True)
    return inside


@torch.jit.unused
@grid_constant
def cached_local_window_mask_2d(
        height: int, width: int, window: int, num_prefix_tokens: int, device: torch.device) -> torch.Tensor:
    """:func:`local_window_mask_2d`, built once per grid and device for eager code (AFT-local's training step
    needs it every call)."""
    return local_window_mask_2d([height, width], window, num_prefix_tokens, device)


@register_notrace_function
def aft_local(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pos_bias: torch.Tensor,
        window: int,
        causal: bool = False,
) -> torch.Tensor:
    """AFT-local (paper eq. 4) over a 1-D sequence: ``pos_bias`` kept where ``abs(t - t') < window`` and 0
    (not -inf) outside.

    Every token still sees every other; outside the window the weight is plain
    ``exp(K)``. This is the paper's 1-D window (token distance along the sequence). The vision
    models' :class:`~aft_vit.layers.AftLocal` mixer does not call it: it keeps the bias inside a 2-D
    square of patches instead (:func:`local_window_mask_2d`, then :func:`aft_full`).
    """
    _check_qkv('aft_local', q, k, v)
    _check_pos_bias('aft_local', q, pos_bias)
    if window < 1:
        raise ValueError(f'aft_local: window must be a positive int, got {window}')
    inside = local_window_mask(q.shape[1], window, q.device)
    return aft_full(q, k, v, pos_bias * inside.to(pos_bias.dtype), causal=causal)


def _sum_outside_window(x: torch.Tensor, radius: int) -> torch.Tensor:
    """For (B, G, H, W) x: at each (y, x), the sum over positions outside the centred (2r+1)^2 window.

    Built only from sums of the terms themselves, never as "total minus window": that subtraction cancels
    catastrophically when the window holds the dominant keys. Products with 0/1 matrices
    (:func:`_sum_outside_window_by_products`) while their H + W multiply-adds per value stay within twice the
    window's (2r+1)^2, prefix sums (:func:`_sum_outside_window_by_prefix_sums`) on larger grids, so that the work
    stays linear in T (``benchmarks/crossover.py`` times both), and in exported graphs, which serve every size.
    """
    exporting = not torch.jit.is_scripting() and is_exporting()
    if not exporting and _products_sum_outside(x.shape[2], x.shape[3], radius):
        return _sum_outside_window_by_products(x, radius)
    return _sum_outside_window_by_prefix_sums(x, radius)


def _products_sum_outside(height: int, width: int, radius: int) -> bool:
    """Whether :func:`_sum_outside_window` uses products on this grid: their H + W multiply-adds a value within
    twice the window's (2r+1)^2."""
    return height + width <= 2 * (2 * radius + 1) ** 2


def _sum_outside_window_by_products(x: torch.Tensor, radius: int) -> torch.Tensor:
    """:func:`_sum_outside_window` as the rows outside the band y-r..y+r, whole, plus the band's columns outside
    x-r..x+r: three batched products with 0/1 matrices (along H of the row sums, along H of x, along W of the band),
    which read channels-last x without a copy. O(T (H + W)) work, in few passes over memory."""
    batch, channels, height, width = x.shape
    near_rows = local_window_mask(height, radius + 1, x.device).to(x.dtype)  # (H, H) 0/1, |y - y'| <= r
    far_cols = 1 - local_window_mask(width, radius + 1, x.device).to(x.dtype)
    pixels = x.permute(0, 2, 3, 1)  # (B, H, W, G): a view of channels-last x
    band = torch.bmm(near_rows.expand(batch, height, height), pixels.reshape(batch, height, width * channels))
    outside = torch.bmm(far_cols.expand(batch * height, width, width), band.view(batch * height, width, channels))
    far_row_sums = torch.bmm((1 - near_rows).expand(batch, height, height), pixels.sum(dim=2))  # (B, H, G)
    outside = outside.view(batch, height, width, channels).add_(far_row_sums.unsqueeze(2))
    return outside.permute(0, 3, 1, 2)


def _sum_outside_window_by_prefix_sums(x: torch.Tensor, radius: int) -> torch.Tensor:
    """:func:`_sum_outside_window` from prefix and suffix sums of rows, then of the band of rows the window spans:
    O(T) work, in more passes over memory than the products."""
    channels = x.shape[1]
    rows = x.sum(dim=-1)  # (B, G, H)
    ones = torch.ones(channels, 1, 2 * radius + 1, 1, dtype=x.dtype, device=x.device)
    band = F.conv2d(x, ones, padding=(radius, 0), groups=channels)  # rows y-r..y+r, a sum of positive terms
    outside = _prefix_before(band, radius)
    outside += _suffix_after(band, radius)
    outside += (_prefix_before(rows, radius) + _suffix_after(rows, radius)).unsqueeze(-1)
    return outside


def _prefix_before(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Along the last dim: at i, the sum over i' < i - r (zeros padded in front: no branch on the size, so an
    exported graph serves every size)."""
    return F.pad(x, (radius + 1, 0)).cumsum(dim=-1).narrow(-1, 0, x.shape[-1])


def _suffix_after(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Along the last dim: at i, the sum over i' > i + r (summed from the end, zeros padded behind)."""
    return F.pad(x, (0, radius + 1)).flip(-1).cumsum(dim=-1).flip(-1).narrow(-1, radius + 1, x.shape[-1])


def _window_index(height: int, width: int, kernel_size: int, device: torch.device) -> torch.Tensor:
    """(T * T,) int64, key-major: entry [t', t] indexes the (h, s*s + 1) table for key t' and query t.

    ``(y'-y+r) * s + (x'-x+r)`` inside the window, ``s * s`` (the outside slot) elsewhere. It depends on the
    grid alone, so eager code builds it once per grid and device (:func:`_cached_window_index`).
    """
    radius = kernel_size // 2
    ys = torch.arange(height, device=device).repeat_interleave(width)
    xs = torch.arange(width, device=device).repeat(height)
    dy = ys.unsqueeze(1) - ys.unsqueeze(0) + radius  # rows: key t', columns: query t
    dx = xs.unsqueeze(1) - xs.unsqueeze(0) + radius
    inside = (dy >= 0) & (dy < kernel_size) & (dx >= 0) & (dx < kernel_size)
    index = torch.where(inside, dy * kernel_size + dx, torch.full_like(dy, kernel_size * kernel_size))
    return index.flatten()


@torch.jit.unused
@grid_constant
def _cached_window_index(height: int, width: int, kernel_size: int, device: torch.device) -> torch.Tensor:
    """:func:`_window_index`, built once per grid and device."""
    return _window_index(height, width, kernel_size, device)


def reparameterized_kernel(kernel: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """AFT-conv's effective (h, s, s) kernel, ``gamma * (w - mean(w)) / std(w) + beta`` per head (paper Sec. 3.4):
    ``kernel`` (h, s, s), ``gamma`` and ``beta`` (h,); ``eps`` keeps the division finite."""
    var, mean = torch.var_mean(kernel, dim=[1, 2], unbiased=False, keepdim=True)
    normalized = (kernel - mean) * torch.rsqrt(var + eps)
    return gamma[:, None, None] * normalized + beta[:, None, None]


def _exp_window_weights(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A (h, s, s) kernel in exp space: ``exp(weight - c)`` inside the window and ``exp(-c)`` outside it, with
    ``c = max(0, max(weight[i]))`` per head so nothing overflows (it cancels), both floored by
    :func:`positive_weights` so that no denominator is 0."""
    shift = weight.detach().amax(dim=[1, 2]).clamp_min(0.)  # (h,)
    return positive_weights(torch.exp(weight - shift[:, None, None])), positive_weights(torch.exp(-shift))


def conv_window_weights(weight: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The (h, T, T) key-by-query weights ``exp(w[t, t'] - c)`` that :func:`aft_conv2d_dense` multiplies by.

    Row t' (key), column t (query): ``exp(weight[i, y'-y+s//2, x'-x+s//2] - c)`` inside the window,
    ``exp(-c)`` outside, with ``c = max(0, max(weight[i]))`` per head so nothing overflows (it cancels).
    Depends on the kernel and the grid only: a mixer in inference builds it once and reuses it.
    """
    num_heads, kernel_size = weight.shape[0], weight.shape[-1]
    window_kernel, outside_weight = _exp_window_weights(weight)
    table = torch.cat([window_kernel.flatten(1), outside_weight.unsqueeze(1)], dim=1)  # (h, s * s + 1)
    if torch.jit.is_scripting():
        num_tokens = height * width
        index = _window_index(height, width, kernel_size, weight.device)
        return table.index_select(1, index).view(num_heads, num_tokens, num_tokens)
    if torch.compiler.is_compiling():
        return _gather_window_weights(table, height, width, kernel_size)
    return _gather_by_cached_index(table, height, width, kernel_size)


@torch.jit.unused
def _gather_by_cached_index(table: torch.Tensor, height: int, width: int, kernel_size: int) -> torch.Tensor:
    """The (h, T, T) weights gathered from the (h, s * s + 1) table by the window index built once per grid."""
    num_tokens = height * width
    index = _cached_window_index(height, width, kernel_size, table.device)
    return table.index_select(1, index).view(table.shape[0], num_tokens, num_tokens)


@torch.jit.unused
def _gather_window_weights(table: torch.Tensor, height: int, width: int, kernel_size: int) -> torch.Tensor:
    """:func:`conv_window_weights`' gather under torch.compile, through ``aft_vit::window_weights``."""
    return torch.ops.aft_vit.window_weights(table, height, width, kernel_size)


# Compiled training gathers the (h, T, T) weights from the (h, s * s + 1) table and sums their gradient back into it
# at every step. Inductor's own loops for the two (a gather, and an index_add fused with the elementwise work around
# it) took ~11 and ~65 ms a step for aft_conv_tiny at batch 1 on an Intel Xeon, against ~16 and ~11 ms for torch's
# index_select and its backward in eager code: so the compiled graph calls these as two opaque operators, with the
# index cached per grid as in eager code.
@torch.library.custom_op('aft_vit::window_weights', mutates_args=())
def _window_weights_op(table: torch.Tensor, height: int, width: int, kernel_size: int) -> torch.Tensor:
    return _gather_by_cached_index(table, height, width, kernel_size)


@torch.library.custom_op('aft_vit::window_weights_backward', mutates_args=())
def _window_weights_backward_op(grad: torch.Tensor, height: int, width: int, kernel_size: int) -> torch.Tensor:
    index = _cached_window_index(height, width, kernel_size, grad.device)
    num_heads = grad.shape[0]
    table_grad = grad.new_zeros(num_heads, kernel_size * kernel_size + 1)
    return table_grad.index_add_(1, index, grad.reshape(num_heads, -1))


@_window_weights_op.register_fake
def _window_weights_fake(table: torch.Tensor, height: int, width: int, kernel_size: int) -> torch.Tensor:
    return table.new_empty(table.shape[0], height * width, height * width)


@_window_weights_backward_op.register_fake
def _window_weights_backward_fake(grad: torch.Tensor, height: int, width: int, kernel_size: int) -> torch.Tensor:
    return grad.new_empty(grad.shape[0], kernel_size * kernel_size + 1)


def _window_weights_setup(ctx, inputs: Tuple, output: torch.Tensor) -> None:
    ctx.grid = inputs[1:]  # height, width, kernel_size


def _window_weights_grad(ctx, grad: torch.Tensor):
    return torch.ops.aft_vit.window_weights_backward(grad, *ctx.grid), None, None, None


_window_weights_op.register_autograd(_window_weights_grad, setup_context=_window_weights_setup)


def _window_weights_keys_reversed(weight: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """:func:`conv_window_weights` with the keys (rows) in reverse token order, built without a gather.

    The weight of key (y', x') for query (y, x) depends on the offset alone, so all of them fit in one
    (h, 2H - 1, 2W - 1) table of offsets. Flipped, that table read with strides (2W - 1, 1) along both the key
    and the query grid is the matrix with its keys reversed (a Hankel view); copying the view is a strided copy
    that torch.compile turns into one vectorized loop, where its lowering of the index table gather measured
    ~20x slower. ``aft_conv2d_dense(q, k.flip([1, 2]), v.flip([1, 2]), these)`` equals the product with
    :func:`conv_window_weights`. The view's backward is slow (overlapping strides): for frozen kernels only.
    """
    num_heads, kernel_size = weight.shape[0], weight.shape[-1]
    radius = kernel_size // 2
    window_kernel, outside_weight = _exp_window_weights(weight)
    # the window centred in the offset table (negative padding crops a kernel larger than the grid)
    pad = [width - 1 - radius, width - 1 - radius, height - 1 - radius, height - 1 - radius]
    inside = F.pad(torch.ones_like(window_kernel[:1]), pad) > 0
    offsets = torch.where(inside, F.pad(window_kernel, pad), outside_weight[:, None, None])  # [i, H-1+dy, W-1+dx]
    flipped = offsets.flip([1, 2]).contiguous()
    row = 2 * width - 1
    hankel = flipped.as_strided([num_heads, height, width, height, width], [flipped.stride(0), row, 1, row, 1])
    return hankel.reshape(num_heads, height * width, height * width)


# The most (h, T, T) exp-space weights a mixer keeps for a block (16 MiB in float32). Above it a kept copy per block
# costs more memory than rebuilding saves time: AFT-full at 896 px (3137 tokens) would hold 39 MB a block.
CACHED_WEIGHTS_LIMIT = 2 ** 22


def dense_is_cheaper(num_tokens: int, kernel_size: int, num_heads: int = 1,
                     max_weights: int = CACHED_WEIGHTS_LIMIT) -> bool:
    """Whether AFT-conv's dense product beats its convolution path: up to 4 s^2 tokens and ``max_weights``
    (h, T, T) weights (16 MiB in float32 per block; above it the weights cost more memory, and, rebuilt every
    training step or read cold at batch 1, more time than the convolution saves). The dense product does T^2
    work per channel, the convolution T s^2, but at a far lower rate on a CPU (a depthwise s x s convolution
    plus the sums outside the window): measured by ``benchmarks/crossover.py`` on three processors, the dense
    product is 1.03 to 4.4x faster up to T = 256 (s = 11) in every layout, batch and mode, and the convolution
    overtakes it in the tiny layout's training between T = 400 and 576 and, on the one processor measured since the
    convolution path's inference runs in place, in the 16-head layout's inference at T = 484
    (benchmarks/README.md names the processors)."""
    return num_tokens <= 4 * kernel_size * kernel_size and num_heads * num_tokens * num_tokens <= max_weights


@register_notrace_function
def aft_conv2d_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """AFT-conv's dense path on precomputed weights: ``weights`` from :func:`conv_window_weights`.

    Args:
        q, v: (B, H, W, C); k: (B, H, W, h); weights: (h, T, T) with T = H * W.

    Returns:
        (B, H, W, C), as :func:`aft_conv2d`. For mixers that reuse ``weights`` while the kernel is unchanged.
    """
    batch, height, width, channels = q.shape
    num_heads, num_tokens = k.shape[-1], height * width
    if weights.shape != (num_heads, num_tokens, num_tokens):
        raise ValueError(
            f'aft_conv2d_dense: weights must be (h, T, T) = ({num_heads}, {num_tokens}, {num_tokens}), '
            f'got {weights.shape}')
    out = aft_dense(q.reshape(batch, num_tokens, channels), k.reshape(batch, num_tokens, num_heads),
                    v.reshape(batch, num_tokens, channels), weights)
    return out.reshape(batch, height, width, channels)


@register_notrace_function
def aft_conv2d(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        weight: torch.Tensor,
        method: str = 'auto',
) -> torch.Tensor:
    """AFT-conv (paper eq. 6) over a 2-D grid: a per-head s x s bias applied as a depthwise convolution.

    Args:
        q, v: (B, H, W, C). Head i owns channels [i*C/h, (i+1)*C/h).
        k: (B, H, W, h), one key channel per head.
        weight: (h, s, s), s odd. For query (y, x) and key (y', x') the bias is
            ``weight[i, y'-y + s//2, x'-x + s//2]`` inside the window (F.conv2d's
            cross-correlation convention) and 0 outside.
        method: 'conv' (O(T s^2) work), 'dense' (one (h, T, T) product, faster on small grids)
            or 'auto' (:func:`dense_is_cheaper`: dense up to 4 s^2 tokens). Both are exact.

    Returns:
        (B, H, W, C), equal to AFT-full with that bias.

    The paper writes the sums as a convolution with ``exp(w) - 1`` plus the global sum. Here
    the window part is a convolution with ``exp(w - c)`` and the rest is the sum over keys
    outside the window times ``exp(-c)``, summed without subtracting (:func:`_sum_outside_window`):
    the same O(T s^2) work, but no difference of large sums, so keys and biases of any
    magnitude stay exact. ``c = max(0, max(w))`` per head keeps ``exp`` finite; like K's
    maximum, it cancels. Numerator and denominator share every product: per head, C/h
    numerator channels and one denominator channel travel together.
    """
    if q.dim() != 4 or v.shape != q.shape:
        raise ValueError(f'aft_conv2d: q and v must both be (B, H, W, C), got q {q.shape}, v {v.shape}')
    batch, height, width, channels = q.shape
    if k.dim() != 4 or k.shape[0] != batch or k.shape[1] != height or k.shape[2] != width:
        raise ValueError(f'aft_conv2d: k must be (B, H, W, h) = ({batch}, {height}, {width}, h), got {k.shape}')
    num_heads = k.shape[3]
    if weight.dim() != 3 or weight.shape[0] != num_heads or weight.shape[1] != weight.shape[2]:
        raise ValueError(f'aft_conv2d: weight must be (h, s, s) with h={num_heads} heads, got {weight.shape}')
    kernel_size = weight.shape[-1]
    if kernel_size % 2 != 1:
        raise ValueError(f'aft_conv2d: kernel size must be odd so the window is centred, got s={kernel_size}')
    if channels % num_heads != 0:
        raise ValueError(
            f'aft_conv2d: channels C={channels} must be divisible by the number of heads h={num_heads}')
    if method not in ('auto', 'conv', 'dense'):
        raise ValueError(f"aft_conv2d: method must be 'auto', 'conv' or 'dense', got '{method}'")
    exporting = not torch.jit.is_scripting() and is_exporting()
    if method == 'auto':
        # the dense path's weights are built for one grid; an exported graph must serve any
        method = 'dense' if not exporting and dense_is_cheaper(height * width, kernel_size, num_heads) else 'conv'
    if method == 'dense':
        if not torch.jit.is_scripting() and torch.compiler.is_compiling() and not (
                torch.is_grad_enabled() and weight.requires_grad):
            # a compiled graph that builds the weights itself (this function called under torch.compile with a
            # kernel that gets no gradient; the mixers reuse theirs through aft_vit.layers.reuse): the
            # compiler's fast form, keys reversed
            return aft_conv2d_dense(q, k.flip([1, 2]), v.flip([1, 2]),
                                    _window_weights_keys_reversed(weight, height, width))
        return aft_conv2d_dense(q, k, v, conv_window_weights(weight, height, width))
    needs_grad = q.requires_grad or k.requires_grad or v.requires_grad or weight.requires_grad
    if torch.is_grad_enabled() and needs_grad and not torch.jit.is_scripting():
        # keep only the inputs for backward and recompute the rest there: the (B, H, W, h (d + 1))
        # intermediates would otherwise dominate training memory at the large grids this path serves
        return checkpoint(_aft_conv2d_conv, q, k, v, weight, use_reentrant=False)
    if torch.jit.is_scripting() or exporting:
        return _aft_conv2d_conv(q, k, v, weight)
    return _aft_conv2d_conv_by_heads(q, k, v, weight)


# Without autograd, the convolution path runs a few heads at a time so that its intermediates, each
# B * T * (C + h) / chunks values, stay under this size. Written in place (``_aft_conv2d_conv(out=)``), about four
# of them are live at once: fewer than the MLP's 4 C hidden values a token and their GELU hold, so a model's peak
# memory stays the MLP's, while a chunk this large keeps the depthwise convolution on many channels at once, where
# it runs faster a channel (``benchmarks/throughput.py`` at 896 px, benchmarks/README.md).
CONV_CHUNK_BYTES = 8 * 2 ** 20


@torch.jit.unused
def _aft_conv2d_conv_by_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`_aft_conv2d_conv` without autograd, over groups of heads (heads are independent), each written into
    its columns of one output."""
    batch, height, width, channels = q.shape
    num_heads = k.shape[3]
    head_dim = channels // num_heads
    stacked_bytes = batch * height * width * (channels + num_heads) * max(q.element_size(), 4)
    chunks = min(num_heads, -(-stacked_bytes // CONV_CHUNK_BYTES))
    heads_per_chunk = -(-num_heads // chunks)
    out = torch.empty(q.shape, dtype=torch.promote_types(q.dtype, v.dtype), device=q.device)
    for start in range(0, num_heads, heads_per_chunk):
        stop = min(num_heads, start + heads_per_chunk)
        cols = slice(start * head_dim, stop * head_dim)
        _aft_conv2d_conv(q[..., cols], k[..., start:stop], v[..., cols], weight[start:stop], out=out[..., cols])
    return out


def _aft_conv2d_conv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The convolution path of :func:`aft_conv2d` on checked inputs: O(T s^2) work, O(B T C) memory.

    With ``out`` (only without autograd, which the in-place steps would break), the result is written there and
    the ratio and the gate reuse the sums' buffers: the high resolutions this path serves are where peak memory
    counts, and every pass fewer over B T C values counts.
    """
    batch, height, width, channels = q.shape
    num_heads = k.shape[3]
    kernel_size = weight.shape[-1]
    head_dim = channels // num_heads
    group = head_dim + 1
    window_kernel, outside_weight = _exp_window_weights(weight)  # (h, s, s) and (h,), in (0, 1]
    exp_k = torch.exp(k - k.detach().amax(dim=[1, 2], keepdim=True)).unsqueeze(-1)  # (B, H, W, h, 1)
    values = v.reshape(batch, height, width, num_heads, head_dim)
    # (B, H, W, h, d + 1): per head, d numerator channels then one denominator channel
    if out is None:
        stacked = torch.cat([exp_k * values, exp_k], dim=-1)
    else:
        stacked = torch.empty(batch, height, width, num_heads, group, dtype=torch.promote_types(exp_k.dtype, v.dtype),
                              device=v.device)
        torch.mul(exp_k, values, out=stacked[..., :head_dim])
        stacked[..., head_dim:] = exp_k
    # channels-last view of the NHWC data: the convolutions read it without a transposing copy
    conv_in = stacked.view(batch, height, width, num_heads * group).permute(0, 3, 1, 2)
    conv_kernel = window_kernel.unsqueeze(1).expand(num_heads, group, kernel_size, kernel_size)
    conv_kernel = conv_kernel.reshape(num_heads * group, 1, kernel_size, kernel_size).to(conv_in.dtype)
    inside = F.conv2d(conv_in, conv_kernel, padding=kernel_size // 2, groups=num_heads * group)
    outside = _sum_outside_window(conv_in, kernel_size // 2)
    # in place: the convolution's backward does not read its output
    total = inside.addcmul_(outside, outside_weight.repeat_interleave(group)[:, None, None].to(outside.dtype))
    total = total.permute(0, 2, 3, 1).reshape(batch, height, width, num_heads, group)
    if out is None:
        ratio = total[..., :head_dim] / total[..., head_dim:]
        return torch.sigmoid(q) * ratio.reshape(batch, height, width, channels)
    ratio = total[..., :head_dim].div_(total[..., head_dim:])
    torch.sigmoid(q, out=out)
    out.view(batch, height, width, num_heads, head_dim).mul_(ratio)
    return out
