"""AFT-conv's banded product: the dense product with weights that fit in cache, for inference on small batches.

AFT-conv's weight for key (y', x') and query (y, x) depends on the offset alone: ``exp(w[y'-y+r, x'-x+r] - c)``
inside the s x s window (r = s // 2), ``exp(-c)`` outside. So the rows of keys y-r..y+r that query row y's window
spans need one (s W, W) matrix per head for every y, and the rows farther away add ``exp(-c)`` times their sums.
With the stacked inputs ``[exp(k) v, exp(k)]`` (as in :mod:`.dense`) padded by r zero rows above and below, the keys
of query row y are s W consecutive values, copied out once per query row (each value s times), with the sum of the
far rows as one more column: then one product per head, (B (d + 1) H, s W + 1) @ (s W + 1, W), gives numerator and
denominator. Every term is a nonnegative weight times a nonnegative input, as in the dense product: exact for keys
and biases of any magnitude.

Why: the dense product reads (h, T, T) weights, 4.8 MB a block for aft_conv_tiny at 224 px (T = 196), 58 MB a forward,
which at small batches pass through the cache at every forward and evict the linear layers' weights. The banded weights
are (h, W, s W + 1), 0.27 MB a block, and the product has a better shape for BLAS (the W query columns are its last dim,
as in the output, so the ratio and the gate that follow move contiguous rows). Its price is the copy of each input s
times, which grows with the batch: :func:`band_is_cheaper` compares the values each path moves. Inference only (no
backward): the mixers call it while their kernel is unchanged and nothing records gradients (:mod:`.reuse`), on
channel-major inputs.
"""
import torch

from .cache import grid_constant
from .dense import _autocast_off
from .functional import _exp_window_weights, local_window_mask

__all__ = ['aft_conv2d_band', 'band_is_cheaper', 'conv_band_weights']


def band_is_cheaper(batch: int, height: int, width: int, kernel_size: int, head_dim: int) -> bool:
    """Whether the banded product moves fewer values than the dense one, per head, counting the dense weights 1.5
    times.

    The dense product reads its T^2 weights whatever the batch, plus the B (d + 1) T stacked inputs; the banded
    one writes and reads the B (d + 1) H (s W + 1) copied windows (its weights, W (s W + 1), are negligible). A
    model's dense weights come from memory at every forward (4.8 MB a block for aft_conv_tiny at 224 px), the
    copies of one block stay in cache: hence the factor, the one that fits ``python benchmarks/crossover.py`` on
    an AMD EPYC without AVX512 with both products on channel-major inputs (at 196 tokens the banded product ran
    1.24x as fast as the dense one at batch 1, 0.94x at batch 2 and 0.72x at batch 4 in the tiny layout, 0.83x at
    batch 1 in the 16-head layout, 1.10x and 1.42x there at 400 and 484 tokens). The factor was 2 while the
    products took token-major inputs (the banded one then 1.03x to 1.10x as fast at batch 2 in three runs of four).
    And only while the banded product does fewer multiply-adds, H W (s W + 1) a channel against the dense T^2, that
    is while s W + 1 <= T (at 100 tokens, kernel 11: 0.73x at batch 1).
    """
    tokens = height * width
    group = head_dim + 1
    band = 2 * batch * group * height * (kernel_size * width + 1)
    return kernel_size * width + 1 <= tokens and band < 1.5 * tokens * tokens + batch * group * tokens


def conv_band_weights(weight: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The (h, W, s W + 1) weights of :func:`aft_conv2d_band` for a (h, s, s) kernel on a grid ``width`` wide.

    Row x (the query's column), column ``dy * W + x'``: the weight of key (y + dy - r, x') for query (y, x), that is
    ``exp(weight[i, dy, x' - x + r] - c)`` if |x' - x| <= r, else ``exp(-c)`` (the key is outside the window);
    the last column: ``exp(-c)``, the weight of the far rows' sum. ``c`` and the floor as in
    :func:`~aft_vit.layers.conv_window_weights`, whose (h, T, T) weights these equal entry by entry.
    ``height`` is accepted for symmetry with it: the weights do not depend on it.
    """
    num_heads, kernel_size = weight.shape[0], weight.shape[-1]
    radius = kernel_size // 2
    window_kernel, outside_weight = _exp_window_weights(weight)
    columns = torch.arange(width, device=weight.device)
    offset = columns.unsqueeze(0) - columns.unsqueeze(1) + radius  # [x, x'] = x' - x + r
    inside = (offset >= 0) & (offset < kernel_size)
    rows = window_kernel[:, :, offset.clamp(0, kernel_size - 1)]  # (h, s (dy), W (x), W (x'))
    rows = torch.where(inside, rows, outside_weight[:, None, None, None])
    near = rows.permute(0, 2, 1, 3).reshape(num_heads, width, kernel_size * width)
    return torch.cat([near, outside_weight[:, None, None].expand(num_heads, width, 1)], dim=2).contiguous()


@grid_constant
def _far_tokens(height: int, width: int, radius: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(H W, H) 0/1: [t', y] = 1 where key token t' is in a row outside query row y's window (|y' - y| > r), so
    that one product sums, for every query row, the rows its window does not span. Built once per grid."""
    far_rows = 1 - local_window_mask(height, radius + 1, device).to(dtype)  # [y', y]
    return far_rows.repeat_interleave(width, dim=0)


@torch.jit.unused
def aft_conv2d_band(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """:func:`~aft_vit.layers.aft_conv2d` on the weights of :func:`conv_band_weights`, without autograd, on
    channel-major inputs: the rows of the mixer's channel-major projection (``AftConv._forward_channel_major``),
    from which the stacked inputs are built by runs of whole grid rows instead of one value per head.

    Args:
        q, v: (C, B, H, W); k: (h, B, H, W); weights: (h, W, s W + 1) with s odd.

    Returns:
        (C, B, H, W) in ``v``'s dtype, a new contiguous tensor; q, k, v are only read. Computed in float32 at least
        (float64 stays float64), as the dense product.
    """
    channels, batch, height, width = q.shape
    num_heads = k.shape[0]
    head_dim = channels // num_heads
    columns = weights.shape[-1]
    kernel_size = (columns - 1) // width
    if weights.shape != (num_heads, width, kernel_size * width + 1) or kernel_size % 2 != 1:
        raise ValueError(f'aft_conv2d_band: weights must be (h, W, s W + 1) with h={num_heads}, W={width} and s odd, '
                         f'got {tuple(weights.shape)}')
    radius = kernel_size // 2
    padded = height + 2 * radius
    group = head_dim + 1
    dtype = torch.promote_types(v.dtype, torch.float32)
    if weights.dtype != dtype:
        weights = weights.to(dtype)
    with _autocast_off(q.device.type):
        # stacked inputs [exp(k - max) v, exp(k - max)], (h, B, d + 1, H + 2r, W), r zero rows above and below
        stacked = torch.empty(num_heads, batch, group, padded, width, dtype=dtype, device=v.device)
        stacked.narrow(3, 0, radius).zero_()
        stacked.narrow(3, radius + height, radius).zero_()
        grid = stacked.narrow(3, radius, height)
        exp_k = grid.select(2, head_dim)  # (h, B, H, W)
        exp_k.copy_(k)
        exp_k.sub_(k.amax(dim=(2, 3), keepdim=True)).exp_()
        values = v.reshape(num_heads, head_dim, batch, height, width).transpose(1, 2)
        torch.mul(exp_k.unsqueeze(2), values, out=grid.narrow(2, 0, head_dim))
        # row y of the windows: padded rows y..y+2r, consecutive in memory, then the sum of the rows outside them
        windows = torch.empty(num_heads, batch, group, height, columns, dtype=dtype, device=v.device)
        strides = stacked.stride()
        windows.narrow(4, 0, columns - 1).copy_(stacked.as_strided(
            (num_heads, batch, group, height, columns - 1), (strides[0], strides[1], strides[2], width, 1)))
        grid_rows = grid.as_strided((num_heads * batch * group, height * width), (padded * width, 1),
                                    grid.storage_offset())
        far = torch.mm(grid_rows, _far_tokens(height, width, radius, dtype, v.device))
        windows.select(4, columns - 1).copy_(far.view(num_heads, batch, group, height))
        # windows as the left factor: the sums come out (h, B, d + 1, H, W), W last as in q and the output, so the
        # ratio and the gate run over contiguous rows (at batch 1 the output's order exactly)
        sums = torch.bmm(windows.view(num_heads, -1, columns), weights.transpose(1, 2))
        sums = sums.view(num_heads, batch, group, height, width)
        ratio = sums.narrow(2, 0, head_dim).div_(sums.narrow(2, head_dim, 1))  # (h, B, d, H, W)
        out = torch.empty(num_heads, head_dim, batch, height, width, dtype=q.dtype, device=q.device)
        torch.sigmoid(q.reshape(out.shape), out=out)
        out.mul_(ratio.transpose(1, 2))
    out = out.view(channels, batch, height, width)
    return out if out.dtype == v.dtype else out.to(v.dtype)
