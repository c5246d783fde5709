"""The dense AFT product shared by AFT-full (and -local) and AFT-conv's small-grid path.

For h heads of d channels, each head with one key channel, and key-by-query weights ``W`` (h, T, T)
already in exp space (``exp(w - shift)``, nonnegative)::

    Y[b, t, i*d + j] = sigmoid(Q[b, t, i*d + j]) * sum_t' W[i, t', t] exp(K[b, t', i]) V[b, t', i*d + j]
                                                 / sum_t' W[i, t', t] exp(K[b, t', i])

AFT-conv has h heads and d = C / h; AFT-full is the case h = C, d = 1, with one ``W`` shared by every
channel (``W.shape[0] == 1``). K's maximum over tokens is subtracted before ``exp`` (it cancels).

Numerator and denominator inputs are stacked as ``x``, seen as (h, B, d + 1, T), so that the whole sum is one matrix
product per head, (B (d + 1), T) @ (T, T), efficient even at batch 1; with a shared ``W`` (stored token-first,
:func:`_empty_stack`) it is one batched product over B, (T, T) @ (T, (d + 1) h), with ``W`` broadcast. Training uses
a hand-written backward (:class:`_DenseAft`; under torch.compile the operators ``aft_vit::dense_forward`` /
``dense_backward``): two more products and a few elementwise passes, instead of autograd's graph of a dozen ops.
Where q, k, v are the slices of a mixer's fused projection, :class:`_DenseAftPacked` writes their gradients into one
tensor, the projection's. Computed in float32 at least (float64 stays float64): bfloat16 exp-weights would lose the
bias' precision, and on CPUs without AMX a float32 product is as fast. The output has ``v``'s dtype. Without
autograd the batch is mixed in chunks (:func:`aft_dense_in_chunks`), so that few large temporaries are allocated;
the mixers let it overwrite their own k.
"""
import contextlib
from typing import ContextManager, List, Optional, Tuple

import torch

__all__ = ['aft_dense', 'aft_dense_channel_major', 'aft_dense_in_chunks', 'can_overwrite', 'is_exporting',
           'overwritable', 'positive_weights', 'records_gradients']


def _autocast_off(device_type: str) -> ContextManager:
    """Leave autocast while the product runs in its own dtype (entered only where autocast is on: the meta device
    has no autocast state at all)."""
    if device_type != 'meta' and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def positive_weights(weights: torch.Tensor) -> torch.Tensor:
    """Exp-space weights floored at float32's smallest normal number (float64's for float64).

    The key with K's maximum has ``exp(K - max) = 1``, so with every weight positive no denominator can be
    0, and none needs a check: the floor replaces weights that underflowed (a bias more than ~87 below its
    row's maximum), which adds at most T times 1e-38 to a sum that holds at least 1e-38.
    """
    tiny = 2.2250738585072014e-308 if weights.dtype == torch.float64 else 1.1754943508222875e-38
    return weights.clamp_min(tiny)


def _empty_stack(batch: int, num_tokens: int, num_heads: int, head_dim: int, shared: bool, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """Uninitialized stacked inputs, seen as (h, B, d + 1, T) whatever their memory layout.

    Per-head weights: stored head-major, tokens last, as seen. Shared weights (AFT-full): stored
    token-first (T, B, d + 1, h), so that building it from and returning it to (B, T, C) tensors moves
    contiguous rows instead of transposing every element, and so that the weights' gradient is one product over
    it as a (T, B (d + 1) h) matrix, without a copy (the forward product reads it as a strided (B, T, (d + 1) h)).
    """
    if shared:
        return torch.empty(num_tokens, batch, head_dim + 1, num_heads, dtype=dtype, device=device).permute(3, 1, 2, 0)
    return torch.empty(num_heads, batch, head_dim + 1, num_tokens, dtype=dtype, device=device)


def _product(x: torch.Tensor, weights: torch.Tensor, shared: bool) -> torch.Tensor:
    """Stacked inputs (as :func:`_empty_stack` lays them out) times key-by-query weights, summed over keys."""
    num_heads, batch, group, num_tokens = x.shape
    if shared:
        # bmm over a broadcast (stride 0) weight and a strided view of x, (B, T, (d + 1) h): no copy of either, and
        # faster than one (T, T) @ (T, B (d + 1) h) product. The output is (B, T, d + 1, h) in memory.
        stored = x.permute(1, 3, 2, 0).reshape(batch, num_tokens, -1)
        out = torch.bmm(weights[0].t().expand(batch, num_tokens, num_tokens), stored)
        return out.view(batch, num_tokens, group, num_heads).permute(3, 0, 2, 1)
    return torch.bmm(x.reshape(num_heads, -1, num_tokens), weights).view(x.shape)


def _stacked_product(x: torch.Tensor, exp_k: Optional[torch.Tensor], v: torch.Tensor, weights: torch.Tensor,
                     shared: bool) -> torch.Tensor:
    """Write ``[exp_k * v, exp_k]`` into ``x`` (laid out as :func:`_empty_stack`) and return its product with the
    weights, numerator divided by denominator in place: the ratio in ``[:, :, :d]``, the denominator after it.

    ``exp_k`` (B, T, h) is already exponentiated and is copied into ``x``; None where the caller has written it
    there (:func:`_dense_forward`). ``v`` (B, T, C).
    """
    num_heads, batch, group, num_tokens = x.shape
    head_dim = group - 1
    stacked_k = x[:, :, head_dim:]  # (h, B, 1, T)
    if exp_k is not None:
        stacked_k.copy_(exp_k.permute(2, 0, 1).unsqueeze(2))
    torch.mul(stacked_k, v.reshape(batch, num_tokens, num_heads, head_dim).permute(2, 0, 3, 1), out=x[:, :, :head_dim])
    y = _product(x, weights, shared)
    y[:, :, :head_dim].div_(y[:, :, head_dim:])
    return y


def _weights_grad(x: torch.Tensor, grad_y: torch.Tensor, shared: bool) -> torch.Tensor:
    """d loss / d weights for y = _product(x, weights): sum over rows of x (key) times grad_y (query)."""
    num_heads, batch, group, num_tokens = x.shape
    if shared:
        # one (T, B N) @ (B N, T) product, over views where x and grad_y are laid out as _empty_stack's
        x_tokens = x.permute(3, 1, 2, 0).reshape(num_tokens, -1)
        grad_tokens = grad_y.permute(3, 1, 2, 0).reshape(num_tokens, -1)
        return torch.mm(x_tokens, grad_tokens.t()).unsqueeze(0)
    return torch.bmm(x.reshape(num_heads, -1, num_tokens).transpose(1, 2), grad_y.reshape(num_heads, -1, num_tokens))


def _sum_of_products(a: torch.Tensor, b: torch.Tensor, shared: bool, out: Optional[torch.Tensor] = None
                     ) -> torch.Tensor:
    """``(a * b).sum(dim=2)`` over the d + 1 stacked channels of two tensors laid out as :func:`_empty_stack`,
    written into ``out`` if given.

    Token-major storage (shared weights) puts those channels h apart in memory: a reduction over them ran ~10x
    slower than one multiply-add per channel (AFT-full's backward, d = 1: two). Head-major storage keeps them T
    apart, where the reduction is as fast and needs one call.
    """
    if not shared:
        return torch.sum(a * b, dim=2, out=out)
    total = torch.mul(a[:, :, 0], b[:, :, 0], out=out)
    for channel in range(1, a.shape[2]):
        total.addcmul_(a[:, :, channel], b[:, :, channel])
    return total


def _dense_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The output and, for backward, x, the product y and sigmoid(q); q, v (B, T, C), k (B, T, h).

    y is returned with its numerator divided by its denominator in place (the ratio, which backward needs too).
    """
    batch, num_tokens, channels = q.shape
    num_heads = k.shape[-1]
    head_dim = channels // num_heads
    dtype = torch.promote_types(v.dtype, torch.float32)
    with _autocast_off(q.device.type):
        shared = weights.shape[0] != num_heads
        x = _empty_stack(batch, num_tokens, num_heads, head_dim, shared, dtype, v.device)
        # exp(k - max) written into x's key slot: no (B, T, h) temporary, whose fresh pages cost more than the
        # strided passes (AFT-full small's training step at batch 32, benchmarks/README.md)
        keys = x[:, :, head_dim:].permute(1, 3, 0, 2)  # (B, T, h, 1)
        torch.sub(k.to(dtype).unsqueeze(3), k.detach().amax(dim=1, keepdim=True).to(dtype).unsqueeze(3), out=keys)
        keys.exp_()
        y = _stacked_product(x, None, v, weights.to(dtype), shared)
        ratio = y[:, :, :head_dim]
        gate = torch.sigmoid(q)
        out = torch.empty(batch, num_tokens, num_heads, head_dim, dtype=v.dtype, device=v.device)
        torch.mul(gate.reshape(batch, num_tokens, num_heads, head_dim), ratio.permute(1, 3, 0, 2), out=out)
    return out.view(batch, num_tokens, channels), x, y, gate


def _dense_backward(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, weights: torch.Tensor,
                    weights_grad: bool, input_dtypes: Tuple[torch.dtype, torch.dtype, torch.dtype],
                    packed: Optional[torch.Tensor] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gradients of q (B, T, C), k (B, T, h), v (B, T, C) in ``input_dtypes`` and, if ``weights_grad``, of the
    weights, from the output's gradient and what :func:`_dense_forward` returned.

    ``packed``: an uninitialized (B, T, 2 C + h) tensor in x's dtype (and all of ``input_dtypes``) into whose
    consecutive slices the gradients of q, k and v are written (:class:`_DenseAftPacked`); they are returned as
    views of it."""
    num_heads, batch, group, num_tokens = x.shape
    head_dim = group - 1
    channels = num_heads * head_dim
    with _autocast_off(grad.device.type):
        grad = grad.reshape(batch, num_tokens, num_heads, head_dim)
        gate = gate.reshape(batch, num_tokens, num_heads, head_dim)
        den = y[:, :, head_dim:]  # (h, B, 1, T), positive (positive_weights)
        ratio = y[:, :, :head_dim]  # (h, B, d, T): numerator / denominator, divided in place by the forward
        grad_q = torch.mul(grad, ratio.permute(1, 3, 0, 2),
                           out=None if packed is None else packed[..., :channels].view(grad.shape))
        torch.ops.aten.sigmoid_backward(grad_q, gate, grad_input=grad_q)  # in place: one buffer fewer
        grad_y = torch.empty_like(x)  # d loss / d (numerator, denominator), laid out as x
        num_grad = grad_y[:, :, :head_dim]
        torch.mul(grad.permute(2, 0, 3, 1), gate.permute(2, 0, 3, 1), out=num_grad)
        num_grad.div_(den)
        den_grad = grad_y[:, :, head_dim:]
        if head_dim == 1:  # a sum over one channel is a copy: multiply into place instead
            torch.mul(num_grad, ratio, out=den_grad).neg_()
        else:
            torch.sum(num_grad * ratio, dim=2, keepdim=True, out=den_grad).neg_()
        shared = weights.shape[0] != num_heads
        grad_x = _product(grad_y, weights.to(x.dtype).transpose(1, 2), shared)
        grad_weights = _weights_grad(x, grad_y, shared).to(weights.dtype) if weights_grad else None
        # x = [exp(k) v, exp(k)]: d/dk sums grad_x * x over the head's d + 1 channels
        grad_k = _sum_of_products(grad_x, x, shared, out=None if packed is None else
                                  packed[..., channels:channels + num_heads].permute(2, 0, 1)).permute(1, 2, 0)
        grad_v = torch.mul(grad_x[:, :, :head_dim], x[:, :, head_dim:], out=None if packed is None else
                           packed[..., channels + num_heads:].view(grad.shape).permute(2, 0, 3, 1))
        grad_v = grad_v.permute(1, 3, 0, 2)  # (B, T, h, d)
    q_dtype, k_dtype, v_dtype = input_dtypes
    return (grad_q.reshape(batch, num_tokens, -1).to(q_dtype), grad_k.to(k_dtype),
            grad_v.reshape(batch, num_tokens, -1).to(v_dtype), grad_weights)


class _DenseAft(torch.autograd.Function):
    """:func:`_dense_forward` with a hand-written backward. Saved: x, y and sigmoid(q), about what
    attention saves (q, k, v, out); nothing is recomputed."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out, x, y, gate = _dense_forward(q, k, v, weights)
        ctx.save_for_backward(x, y, gate, weights)
        ctx.input_dtypes = (q.dtype, k.dtype, v.dtype)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, y, gate, weights = ctx.saved_tensors
        return _dense_backward(grad, x, y, gate, weights, ctx.needs_input_grad[3], ctx.input_dtypes)


class _DenseAftPacked(torch.autograd.Function):
    """:class:`_DenseAft` for q, k, v that are consecutive slices of one (B, T, 2 C + h) projection (a mixer's fused
    ``qkv``), taking that projection and returning its gradient as one tensor.

    Why: autograd's backward of the split allocates the projection's gradient and copies the three gradients into
    it; here they are written there directly. In AFT-full small's training step at batch 32 the split's backward was
    a (B, T, 3 C) allocation and copy a block, and such fresh allocations cost page faults (benchmarks/README.md)."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, weights: torch.Tensor, sizes: List[int]) -> torch.Tensor:
        q, k, v = qkv.split(sizes, dim=-1)
        out, x, y, gate = _dense_forward(q, k, v, weights)
        ctx.save_for_backward(x, y, gate, weights)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, y, gate, weights = ctx.saved_tensors
        num_heads, batch, group, num_tokens = x.shape
        packed = x.new_empty(batch, num_tokens, 2 * num_heads * (group - 1) + num_heads)
        grad_weights = _dense_backward(grad, x, y, gate, weights, ctx.needs_input_grad[1], (x.dtype,) * 3,
                                       packed=packed)[3]
        return packed, grad_weights, None


def _packed_projection(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[torch.Tensor]:
    """The (B, T, 2 C + h) tensor of which q, k, v are consecutive last-dimension slices, in order, if they are (a
    mixer's split of its fused ``qkv`` output) and in the product's own dtype (float32 or float64), else None."""
    base = q._base
    if base is None or k._base is not base or v._base is not base or not base.is_contiguous():
        return None
    if not _in_product_dtype(q, k, v):
        return None
    batch, num_tokens, channels = q.shape
    width = 2 * channels + k.shape[-1]
    if base.numel() != batch * num_tokens * width:
        return None
    strides = (num_tokens * width, width, 1)
    start = base.storage_offset()
    if (q.stride() != strides or k.stride() != strides or v.stride() != strides or q.storage_offset() != start
            or k.storage_offset() != start + channels or v.storage_offset() != start + channels + k.shape[-1]):
        return None
    return base.view(batch, num_tokens, width)


# Under torch.compile the same forward and backward run as two opaque operators, so that compiled training gets
# the hand-written backward too (the compiler would derive autograd's longer one from the plain ops).
@torch.library.custom_op('aft_vit::dense_forward', mutates_args=())
def _dense_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _dense_forward(q, k, v, weights)


def _dense_backward_outputs(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                            weights: torch.Tensor, weights_grad: bool, q_dtype: torch.dtype, k_dtype: torch.dtype,
                            v_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_dense_backward` with an empty tensor for the weights' gradient when it is not asked for."""
    grad_q, grad_k, grad_v, grad_weights = _dense_backward(
        grad, x, y, gate, weights, weights_grad, (q_dtype, k_dtype, v_dtype))
    return grad_q, grad_k, grad_v, grad_weights if grad_weights is not None else weights.new_empty(0)


_dense_backward_op = torch.library.custom_op('aft_vit::dense_backward', _dense_backward_outputs, mutates_args=())
# plain tensor code: run on fake tensors, each function gives the real outputs' shapes and strides
_dense_forward_op.register_fake(_dense_forward)
_dense_backward_op.register_fake(_dense_backward_outputs)


def _dense_op_setup(ctx, inputs: Tuple[torch.Tensor, ...], output: Tuple[torch.Tensor, ...]) -> None:
    q, k, v, weights = inputs
    _, x, y, gate = output
    ctx.save_for_backward(x, y, gate, weights)
    ctx.input_dtypes = (q.dtype, k.dtype, v.dtype)


def _dense_op_backward(ctx, grad: torch.Tensor, *unused_grads: Optional[torch.Tensor]):
    """Only the output gets a gradient: x, y and sigmoid(q) are returned for backward alone."""
    x, y, gate, weights = ctx.saved_tensors
    grad_q, grad_k, grad_v, grad_weights = torch.ops.aft_vit.dense_backward(
        grad, x, y, gate, weights, ctx.needs_input_grad[3], *ctx.input_dtypes)
    return grad_q, grad_k, grad_v, grad_weights if ctx.needs_input_grad[3] else None


_dense_forward_op.register_autograd(_dense_op_backward, setup_context=_dense_op_setup)


# The most bytes of stacked inputs that :func:`aft_dense_in_chunks` holds at once (and as many of their product).
INFERENCE_CHUNK_BYTES = 4 * 2 ** 20


@torch.jit.unused
def can_overwrite(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`aft_dense_in_chunks` may overwrite ``k``: no gradient is recorded for the projections, they
    are in the product's own dtype (float32 or float64: under bfloat16 autocast ``k``'s exp must not be rounded), and
    nothing traces or compiles the call (a graph must not see its inputs change)."""
    return not (is_exporting() or torch.compiler.is_compiling()) and overwritable(q, k, v)


@torch.jit.unused
def overwritable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """:func:`can_overwrite` for callers that already know nothing traces or compiles the call (the mixers, which
    reuse what they derive only then): the checks on the tensors alone, without the tracer queries."""
    return not records_gradients(q, k, v) and _in_product_dtype(q, k, v)


def _in_product_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether q, k, v are all in the dtype the product computes in (float32 or float64), so that its results can be
    written into them or beside them without rounding."""
    return q.dtype in (torch.float32, torch.float64) and q.dtype == k.dtype == v.dtype


def records_gradients(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether autograd records a product of these projections (then only paths with a backward may take them)."""
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _images_per_chunk(num_tokens: int, num_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Images per chunk of the inference products: up to ``INFERENCE_CHUNK_BYTES`` of stacked inputs, at least one."""
    per_image = num_tokens * (head_dim + 1) * num_heads * torch.finfo(dtype).bits // 8
    return max(1, INFERENCE_CHUNK_BYTES // per_image)


def _exp_shifted_keys(k: torch.Tensor, token_dim: int, dtype: torch.dtype, overwrite: bool) -> torch.Tensor:
    """``exp(k - max over tokens)`` in ``dtype``: in place in ``k`` with ``overwrite`` (k then already in that
    dtype, :func:`can_overwrite`), else a new tensor."""
    if overwrite:
        return k.sub_(k.amax(dim=token_dim, keepdim=True)).exp_()
    return (k.to(dtype) - k.amax(dim=token_dim, keepdim=True).to(dtype)).exp_()


@torch.jit.unused
def aft_dense_in_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor,
                        overwrite: bool = False) -> torch.Tensor:
    """:func:`aft_dense` without autograd, the batch in chunks of up to ``INFERENCE_CHUNK_BYTES`` of stacked inputs,
    each chunk's gated ratio written into its rows of one output. ``overwrite``: ``k`` is overwritten by
    ``exp(k - max)`` (a mixer's own projection that :func:`can_overwrite` accepts) instead of copied.

    Why: at batch 32 :func:`_dense_forward`'s whole-batch temporaries (the shifted keys, the stacked inputs and
    their product, the gate, the output) are 68 MB a block for AFT-full small. glibc gives such heap tops back to
    the system when they are freed and maps them again, zeroed, page by page, in the next block: a forward took
    two to three times DeiT-small's page faults (benchmarks/README.md, "Page faults"). Each image's product is the same
    in a chunk as in the whole batch. Returns a new contiguous (B, T, C) tensor in ``v``'s dtype.
    """
    batch, num_tokens, channels = q.shape
    num_heads = k.shape[-1]
    head_dim = channels // num_heads
    shared = weights.shape[0] != num_heads
    dtype = torch.promote_types(v.dtype, torch.float32)
    if weights.dtype != dtype:
        weights = weights.to(dtype)
    out = torch.empty(batch, num_tokens, num_heads, head_dim, dtype=v.dtype, device=v.device)
    step = _images_per_chunk(num_tokens, num_heads, head_dim, dtype)
    with _autocast_off(q.device.type):
        exp_k = _exp_shifted_keys(k, 1, dtype, overwrite)
        for start in range(0, batch, step):
            end = min(batch, start + step)
            x = _empty_stack(end - start, num_tokens, num_heads, head_dim, shared, dtype, v.device)
            ratio = _stacked_product(x, exp_k[start:end], v[start:end], weights, shared)[:, :, :head_dim]
            rows = out[start:end]
            torch.sigmoid(q[start:end].reshape(rows.shape), out=rows)
            rows.mul_(ratio.permute(1, 3, 0, 2))
    return out.view(batch, num_tokens, channels)


@torch.jit.unused
def aft_dense_channel_major(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor,
                            overwrite: bool = False) -> torch.Tensor:
    """:func:`aft_dense_in_chunks` with per-head weights (h, T, T) on channel-major inputs, q, v (C, B, T) and
    k (h, B, T): the rows of AFT-conv's channel-major projection (``AftConv._forward_channel_major``). Returns a new
    contiguous (C, B, T) tensor in ``v``'s dtype; ``overwrite`` as there.

    Why: the stacked inputs and the product are token-last, so building them from token-major projections and
    gating the ratio back reads or writes one value per head at a time (three passes at ~1 ns a value, AFT-conv
    small at batch 32); from channel-major rows every pass moves runs of T values.
    """
    channels, batch, num_tokens = q.shape
    num_heads = k.shape[0]
    head_dim = channels // num_heads
    dtype = torch.promote_types(v.dtype, torch.float32)
    if weights.dtype != dtype:
        weights = weights.to(dtype)
    out = torch.empty(num_heads, head_dim, batch, num_tokens, dtype=v.dtype, device=v.device)
    step = _images_per_chunk(num_tokens, num_heads, head_dim, dtype)
    gates = q.reshape(out.shape)
    values = v.reshape(out.shape)
    with _autocast_off(q.device.type):
        exp_k = _exp_shifted_keys(k, 2, dtype, overwrite)
        for start in range(0, batch, step):
            end = min(batch, start + step)
            x = torch.empty(num_heads, end - start, head_dim + 1, num_tokens, dtype=dtype, device=v.device)
            keys = exp_k[:, start:end]
            x[:, :, head_dim].copy_(keys)
            torch.mul(keys.unsqueeze(2), values[:, :, start:end].transpose(1, 2), out=x[:, :, :head_dim])
            y = torch.bmm(x.view(num_heads, -1, num_tokens), weights).view(x.shape)
            ratio = y[:, :, :head_dim].div_(y[:, :, head_dim:])
            rows = out[:, :, start:end]
            torch.sigmoid(gates[:, :, start:end], out=rows)
            rows.mul_(ratio.transpose(1, 2))
    return out.view(channels, batch, num_tokens)


@torch.jit.unused
def is_exporting() -> bool:
    """Whether the forward is being recorded for a file (torch.export, the ONNX exporters, torch.jit.trace): then
    the graph holds plain ops (not the dense Function's in-place writes, nor this package's operators), AFT-conv
    takes its convolution path, whose graph holds for every input size, and nothing is cached."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


@torch.jit.unused
def _dense_compiled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return torch.ops.aft_vit.dense_forward(q, k, v, weights)[0]


@torch.jit.unused
def _dense_no_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return aft_dense_in_chunks(q, k, v, weights)


@torch.jit.unused
def _dense_function(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    qkv = _packed_projection(q, k, v)
    if qkv is not None:
        return _DenseAftPacked.apply(qkv, weights, [q.shape[-1], k.shape[-1], v.shape[-1]])
    return _DenseAft.apply(q, k, v, weights)


def _dense_ops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """:func:`_dense_forward` in plain differentiable ops, for TorchScript and the exporters."""
    batch, num_tokens, channels = q.shape
    num_heads = k.shape[-1]
    head_dim = channels // num_heads
    dtype = torch.promote_types(v.dtype, torch.float32)
    exp_k = torch.exp(k.to(dtype) - k.detach().amax(dim=1, keepdim=True).to(dtype)).permute(2, 0, 1).unsqueeze(2)
    values = v.to(dtype).reshape(batch, num_tokens, num_heads, head_dim).permute(2, 0, 3, 1)
    y = _product(torch.cat([exp_k * values, exp_k], dim=2), weights.to(dtype), weights.shape[0] != num_heads)
    out = (y[:, :, :head_dim] / y[:, :, head_dim:]).permute(1, 3, 0, 2).reshape(batch, num_tokens, channels)
    return (torch.sigmoid(q) * out).to(v.dtype)


def aft_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The dense AFT product (module docstring) on checked inputs.

    Args:
        q, v: (B, T, C); k: (B, T, h) with h dividing C; weights: (h, T, T) or (1, T, T), key-by-query,
            in exp space and floored by :func:`positive_weights`.

    Returns:
        (B, T, C) in ``v``'s dtype.
    """
    if torch.jit.is_scripting() or is_exporting():
        return _dense_ops(q, k, v, weights)  # autograd (or the exporter) derives the backward
    if torch.compiler.is_compiling():
        return _dense_compiled(q, k, v, weights)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or weights.requires_grad):
        return _dense_function(q, k, v, weights)
    return _dense_no_grad(q, k, v, weights)
