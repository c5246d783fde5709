"""Independent references: the AFT formula written out literally (a T x T softmax per channel), float64."""
import torch


def naive_aft(q, k, v, pos_bias, causal=False):
    """Y_t = sigmoid(Q_t) * sum_t' softmax_t'(K_t' + w[t, t']) V_t', the (B, T, T, C) logits built in full."""
    q, k, v, pos_bias = (x.double() for x in (q, k, v, pos_bias))
    logits = k.unsqueeze(1) + pos_bias[None, :, :, None]  # (B, T query, T key, C)
    if causal:
        num_tokens = pos_bias.shape[0]
        allowed = torch.ones(num_tokens, num_tokens, dtype=torch.bool).tril()
        logits = logits.masked_fill(~allowed[None, :, :, None], float('-inf'))
    weights = torch.softmax(logits, dim=2)
    return torch.sigmoid(q) * (weights * v.unsqueeze(1)).sum(dim=2)


def dense_conv_bias(weight, height, width):
    """(h, T, T) bias of AFT-conv: weight[i, y'-y+s//2, x'-x+s//2] inside the s x s window, 0 outside.

    Written with plain loops over query and key positions, independent of any convolution.
    """
    num_heads, size, _ = weight.shape
    half = size // 2
    bias = torch.zeros(num_heads, height * width, height * width, dtype=torch.float64)
    for y in range(height):
        for x in range(width):
            for y2 in range(height):
                for x2 in range(width):
                    dy, dx = y2 - y + half, x2 - x + half
                    if 0 <= dy < size and 0 <= dx < size:
                        bias[:, y * width + x, y2 * width + x2] = weight[:, dy, dx].double()
    return bias


def naive_aft_conv2d(q, k, v, weight):
    """AFT-conv through naive_aft, head by head, on the dense bias of dense_conv_bias."""
    batch, height, width, channels = q.shape
    num_heads = k.shape[-1]
    head_dim = channels // num_heads
    bias = dense_conv_bias(weight, height, width)
    out = torch.zeros(batch, height * width, channels, dtype=torch.float64)
    for i in range(num_heads):
        cols = slice(i * head_dim, (i + 1) * head_dim)
        k_head = k[..., i:i + 1].expand(batch, height, width, head_dim).reshape(batch, -1, head_dim)
        out[..., cols] = naive_aft(
            q[..., cols].reshape(batch, -1, head_dim), k_head, v[..., cols].reshape(batch, -1, head_dim), bias[i])
    return out.reshape(batch, height, width, channels)


def window_1d(num_tokens, window):
    idx = torch.arange(num_tokens)
    return ((idx[:, None] - idx[None, :]).abs() < window).double()


def window_2d(height, width, window, num_prefix):
    """Patch window of a centred window x window square, prefix tokens inside every window; loops, no tricks."""
    num_tokens = num_prefix + height * width
    mask = torch.ones(num_tokens, num_tokens, dtype=torch.float64)
    half = window // 2
    for a in range(height * width):
        for b in range(height * width):
            ya, xa, yb, xb = a // width, a % width, b // width, b % width
            if abs(ya - yb) > half or abs(xa - xb) > half:
                mask[num_prefix + a, num_prefix + b] = 0.
    return mask
