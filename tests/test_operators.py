"""AFT operators against the literal formula in float64, at large magnitudes, under autocast, and their costs."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from aft_vit.layers import (
    aft_conv2d, aft_conv2d_dense, aft_full, aft_local, aft_simple, conv_window_weights, local_window_mask_2d)
from aft_vit.layers.dense import aft_dense
from tests.reference import naive_aft, naive_aft_conv2d, window_1d, window_2d

# (std, offset) of keys and biases: ordinary, then magnitudes of 80 and more where float32 exp overflows
MAGNITUDES = [(1., 0.), (30., 80.), (80., 0.), (5., 200.)]
EXACT = dict(rtol=1e-6, atol=1e-10)


def _tokens(batch=2, num_tokens=24, channels=6, std=1., offset=0., dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, num_tokens, channels, generator=g, dtype=dtype)
    k = torch.randn(batch, num_tokens, channels, generator=g, dtype=dtype) * std + offset
    v = torch.randn(batch, num_tokens, channels, generator=g, dtype=dtype)
    w = torch.randn(num_tokens, num_tokens, generator=g, dtype=dtype) * std + offset
    return q, k, v, w


def _grid(batch=2, height=7, width=6, channels=8, heads=4, size=5, std=1., offset=0., dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, height, width, channels, generator=g, dtype=dtype)
    k = torch.randn(batch, height, width, heads, generator=g, dtype=dtype) * std + offset
    v = torch.randn(batch, height, width, channels, generator=g, dtype=dtype)
    w = torch.randn(heads, size, size, generator=g, dtype=dtype) * std + offset
    return q, k, v, w


@pytest.mark.parametrize('std,offset', MAGNITUDES)
@pytest.mark.parametrize('causal', [False, True])
def test_aft_full_matches_formula(std, offset, causal):
    q, k, v, w = _tokens(std=std, offset=offset)
    torch.testing.assert_close(aft_full(q, k, v, w, causal=causal), naive_aft(q, k, v, w, causal), **EXACT)


@pytest.mark.parametrize('std,offset', MAGNITUDES)
@pytest.mark.parametrize('causal', [False, True])
def test_aft_simple_matches_formula(std, offset, causal):
    q, k, v, w = _tokens(std=std, offset=offset)
    torch.testing.assert_close(aft_simple(q, k, v, causal=causal), naive_aft(q, k, v, w * 0, causal), **EXACT)


@pytest.mark.parametrize('std,offset', MAGNITUDES)
@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('window', [1, 3, 100])
def test_aft_local_matches_formula(std, offset, causal, window):
    q, k, v, w = _tokens(std=std, offset=offset)
    expected = naive_aft(q, k, v, w * window_1d(w.shape[0], window), causal)  # 0 (not -inf) outside the window
    torch.testing.assert_close(aft_local(q, k, v, w, window, causal=causal), expected, **EXACT)


@pytest.mark.parametrize('std,offset', MAGNITUDES)
@pytest.mark.parametrize('size', [1, 3, 5, 15])
@pytest.mark.parametrize('method', ['conv', 'dense', 'auto'])
def test_aft_conv2d_matches_formula(std, offset, size, method):
    q, k, v, w = _grid(std=std, offset=offset, size=size)
    torch.testing.assert_close(aft_conv2d(q, k, v, w, method=method), naive_aft_conv2d(q, k, v, w), **EXACT)


@pytest.mark.parametrize('height,width', [(1, 1), (1, 9), (9, 2), (12, 13)])
def test_aft_conv2d_paths_agree_on_any_grid(height, width):
    q, k, v, w = _grid(height=height, width=width, size=5, std=20.)
    dense = aft_conv2d(q, k, v, w, method='dense')
    torch.testing.assert_close(aft_conv2d(q, k, v, w, method='conv'), dense, **EXACT)
    torch.testing.assert_close(dense, naive_aft_conv2d(q, k, v, w), **EXACT)


@pytest.mark.parametrize('height,width,size', [(1, 1, 5), (1, 9, 5), (9, 2, 5), (12, 13, 5), (7, 6, 15)])
def test_compiled_inference_weights_are_the_window_weights_with_keys_reversed(height, width, size):
    """torch.compile builds the dense weights as a strided view with the keys reversed (and flips k, v to match)."""
    from aft_vit.layers.functional import _window_weights_keys_reversed
    q, k, v, w = _grid(height=height, width=width, size=size, std=20.)
    reversed_keys = _window_weights_keys_reversed(w, height, width)
    assert torch.equal(reversed_keys.flip(1), conv_window_weights(w, height, width))
    out = aft_conv2d_dense(q, k.flip([1, 2]), v.flip([1, 2]), reversed_keys)
    torch.testing.assert_close(out, naive_aft_conv2d(q, k, v, w), **EXACT)


@pytest.mark.parametrize('heads', [1, 2, 8])
def test_aft_conv2d_equals_aft_full_with_dense_bias(heads):
    """aft_conv2d is AFT-full with the window bias; aft_full computes the same thing densely."""
    q, k, v, w = _grid(heads=heads, size=3, std=3.)
    out = aft_conv2d(q, k, v, w)
    batch, height, width, channels = q.shape
    head_dim = channels // heads
    from tests.reference import dense_conv_bias
    bias = dense_conv_bias(w, height, width)
    for i in range(heads):
        cols = slice(i * head_dim, (i + 1) * head_dim)
        k_head = k[..., i:i + 1].expand(-1, -1, -1, head_dim).reshape(batch, -1, head_dim)
        dense = aft_full(q[..., cols].reshape(batch, -1, head_dim), k_head,
                         v[..., cols].reshape(batch, -1, head_dim), bias[i])
        torch.testing.assert_close(out[..., cols].reshape(batch, -1, head_dim), dense, **EXACT)


@pytest.mark.parametrize('std,offset', MAGNITUDES)
def test_aft_conv2d_conv_path_in_head_chunks_matches_formula(std, offset, monkeypatch):
    """Without autograd the convolution path runs a few heads at a time, written in place into each head's columns;
    every chunk size gives the formula, for separate inputs and for views of one fused qkv tensor (as the mixers
    pass them)."""
    from aft_vit.layers import functional
    q, k, v, w = _grid(heads=4, channels=8, size=5, std=std, offset=offset)
    expected = naive_aft_conv2d(q, k, v, w)
    fused = torch.cat([q, k, v], dim=-1).split([8, 4, 8], dim=-1)
    for chunk_bytes in (1, 2 * 7 * 6 * 12 * 8 // 2, 2 ** 40):  # one head, two heads, all heads per chunk
        monkeypatch.setattr(functional, 'CONV_CHUNK_BYTES', chunk_bytes)
        for inputs in ((q, k, v), fused):
            torch.testing.assert_close(aft_conv2d(*inputs, w, method='conv'), expected, **EXACT)


def _float32_large():
    """Keys and biases around 90: exp overflows float32 in the naive formula.

    Returned in float64 but rounded to float32 values, so the float64 reference sees the same inputs.
    """
    tokens = [x.float().double() for x in _tokens(std=3., offset=90.)]
    grid = [x.float().double() for x in _grid(std=3., offset=90.)]
    return tokens, grid


def test_float32_large_magnitudes_do_not_overflow():
    (q, k, v, w), (qc, kc, vc, wc) = _float32_large()
    f32 = lambda *xs: [x.float() for x in xs]  # noqa: E731
    naive32 = torch.sigmoid(q.float()) * (torch.exp(k.float()) * v.float()).sum(1, keepdim=True)
    assert not torch.isfinite(naive32).all(), 'inputs must be large enough to overflow the naive float32 formula'
    cases = [
        (aft_full(*f32(q, k, v, w)), naive_aft(q, k, v, w)),
        (aft_full(*f32(q, k, v, w), causal=True), naive_aft(q, k, v, w, causal=True)),
        (aft_simple(*f32(q, k, v)), naive_aft(q, k, v, w * 0)),
        (aft_simple(*f32(q, k, v), causal=True), naive_aft(q, k, v, w * 0, causal=True)),
        (aft_local(*f32(q, k, v, w), 4), naive_aft(q, k, v, w * window_1d(w.shape[0], 4))),
        (aft_conv2d(*f32(qc, kc, vc, wc), method='conv'), naive_aft_conv2d(qc, kc, vc, wc)),
        (aft_conv2d(*f32(qc, kc, vc, wc), method='dense'), naive_aft_conv2d(qc, kc, vc, wc)),
    ]
    for out, expected in cases:
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


def test_bfloat16_autocast_finite_and_close():
    (q, k, v, w), (qc, kc, vc, wc) = _float32_large()
    f32 = lambda *xs: [x.float() for x in xs]  # noqa: E731
    with torch.autocast('cpu', dtype=torch.bfloat16):
        cases = [
            (aft_full(*f32(q, k, v, w)), naive_aft(q, k, v, w)),
            (aft_simple(*f32(q, k, v)), naive_aft(q, k, v, w * 0)),
            (aft_local(*f32(q, k, v, w), 4), naive_aft(q, k, v, w * window_1d(w.shape[0], 4))),
            (aft_conv2d(*f32(qc, kc, vc, wc), method='conv'), naive_aft_conv2d(qc, kc, vc, wc)),
            (aft_conv2d(*f32(qc, kc, vc, wc), method='dense'), naive_aft_conv2d(qc, kc, vc, wc)),
        ]
    for out, expected in cases:
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), expected, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize('op', ['full', 'simple', 'local'])
def test_causal_does_not_look_ahead(op):
    q, k, v, w = _tokens(num_tokens=16)
    run = {
        'full': lambda q, k, v: aft_full(q, k, v, w, causal=True),
        'simple': lambda q, k, v: aft_simple(q, k, v, causal=True),
        'local': lambda q, k, v: aft_local(q, k, v, w, 3, causal=True),
    }[op]
    before = run(q, k, v)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    k2[:, 10:] += 50.
    v2[:, 10:] = torch.randn_like(v2[:, 10:])
    q2[:, 10:] = -q2[:, 10:]
    after = run(q2, k2, v2)
    torch.testing.assert_close(after[:, :10], before[:, :10], rtol=0, atol=0)
    assert not torch.allclose(after[:, 10:], before[:, 10:])


def test_gradients_match_finite_differences():
    q, k, v, w = (x.requires_grad_() for x in _tokens(batch=2, num_tokens=5, channels=2, std=2.))
    assert torch.autograd.gradcheck(lambda *a: aft_full(*a), (q, k, v, w))
    assert torch.autograd.gradcheck(lambda *a: aft_full(*a, causal=True), (q, k, v, w))
    assert torch.autograd.gradcheck(lambda q, k, v: aft_simple(q, k, v, causal=True), (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: aft_simple(q, k, v), (q, k, v))
    assert torch.autograd.gradcheck(lambda *a: aft_local(*a, 2), (q, k, v, w))
    # two channels per head, and one (h = C, as the paper's 192- and 384-head models: the backward's d = 1 case)
    for channels in (4, 2):
        qc, kc, vc, wc = (x.requires_grad_()
                          for x in _grid(batch=1, height=4, width=3, channels=channels, heads=2, size=3))
        for method in ('conv', 'dense'):
            assert torch.autograd.gradcheck(lambda *a: aft_conv2d(*a, method=method), (qc, kc, vc, wc))


@pytest.mark.parametrize('heads,head_dim', [(6, 1), (2, 3)])  # AFT-full's shared weights; AFT-conv's per-head ones
def test_slices_of_one_projection_get_one_gradient_equal_to_the_split_ones(heads, head_dim):
    """q, k, v as a mixer's split of its fused projection: the dense product takes the projection and returns its
    gradient whole (no backward of the split); values and gradients equal those through the three slices."""
    g = torch.Generator().manual_seed(0)
    channels = heads * head_dim
    qkv = torch.randn(2, 5, 2 * channels + heads, generator=g, dtype=torch.float64, requires_grad=True)
    shared = head_dim == 1
    w = torch.randn(5, 5, generator=g, dtype=torch.float64, requires_grad=True)

    def product(qkv, w):
        q, k, v = qkv.split([channels, heads, channels], dim=-1)
        if shared:
            return aft_full(q, k, v, w)
        weights = torch.exp(w).expand(heads, 5, 5)
        return aft_dense(q, k, v, weights)

    out = product(qkv, w)
    assert type(out.grad_fn).__name__ == '_DenseAftPackedBackward'
    assert torch.autograd.gradcheck(product, (qkv, w))
    # the same slices as separate tensors take the unpacked product: the same values and gradients
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    copies = [t.detach().clone().requires_grad_() for t in qkv.split([channels, heads, channels], dim=-1)]
    w_copy = w.detach().clone().requires_grad_()
    if shared:
        separate = aft_full(*copies, w_copy)
    else:
        separate = aft_dense(*copies, torch.exp(w_copy).expand(heads, 5, 5))
    assert type(separate.grad_fn).__name__ == '_DenseAftBackward'
    torch.testing.assert_close(out, separate, **EXACT)
    packed_grads = torch.autograd.grad(out, (qkv, w), grad)
    separate_grads = torch.autograd.grad(separate, (*copies, w_copy), grad)
    torch.testing.assert_close(packed_grads[0], torch.cat(separate_grads[:3], dim=-1), **EXACT)
    torch.testing.assert_close(packed_grads[1], separate_grads[3], **EXACT)


def test_slices_out_of_order_or_in_bfloat16_take_the_split_product():
    qkv = torch.randn(2, 5, 9, requires_grad=True)
    weights = torch.rand(3, 5, 5) + 0.1
    k, q, v = qkv.split([3, 3, 3], dim=-1)  # k first: q is not the projection's first slice
    assert type(aft_dense(q, k, v, weights).grad_fn).__name__ == '_DenseAftBackward'
    q, k, v = qkv.bfloat16().split([3, 3, 3], dim=-1)
    assert type(aft_dense(q, k, v, weights).grad_fn).__name__ == '_DenseAftBackward'


class _ShapeRecorder(TorchDispatchMode):
    """Records the size, in elements, of the largest storage any op's output holds: what was built, so that an
    expanded (stride 0) view of a small tensor does not count as large."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


def _largest_tensor(fn, *args):
    recorder = _ShapeRecorder()
    with recorder:
        fn(*args)
    return recorder.largest


def test_simple_and_conv_never_build_token_by_token_tensors():
    num_tokens = 48 * 48  # T^2 = 5.3M elements, far above B * T * C
    q, k, v = (torch.randn(1, num_tokens, 8) for _ in range(3))
    for causal in (False, True):
        assert _largest_tensor(lambda: aft_simple(q, k, v, causal=causal)) < num_tokens * num_tokens // 100
    qc, vc = torch.randn(1, 48, 48, 8), torch.randn(1, 48, 48, 8)
    kc, wc = torch.randn(1, 48, 48, 2), torch.randn(2, 11, 11)
    assert _largest_tensor(lambda: aft_conv2d(qc, kc, vc, wc, method='conv')) < num_tokens * num_tokens // 100
    assert _largest_tensor(aft_conv2d, qc, kc, vc, wc) < num_tokens * num_tokens // 100  # 'auto' picks conv here


def test_full_and_local_never_build_batch_token_token_channel_tensors():
    batch, num_tokens, channels = 2, 196, 16
    q, k, v, w = _tokens(batch=batch, num_tokens=num_tokens, channels=channels, dtype=torch.float32)
    limit = max(batch * num_tokens * num_tokens, batch * num_tokens * 2 * channels)  # (B, T, T) is allowed
    assert limit < batch * num_tokens * num_tokens * channels
    assert _largest_tensor(aft_full, q, k, v, w) <= limit
    assert _largest_tensor(lambda: aft_local(q, k, v, w, 5, causal=True)) <= limit


@pytest.mark.parametrize('height, width, radius', [(9, 7, 2), (4, 6, 3), (5, 5, 0)])
def test_both_ways_of_summing_outside_the_window_match_the_naive_sum(height, width, radius):
    from aft_vit.layers.functional import _sum_outside_window_by_prefix_sums, _sum_outside_window_by_products
    g = torch.Generator().manual_seed(0)
    # positive terms spanning 60 orders of magnitude, channels-last as the convolution path lays them out
    x = torch.exp(40 * torch.randn(2, height, width, 3, generator=g, dtype=torch.float64)).permute(0, 3, 1, 2)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing='ij')
    expected = torch.empty_like(x)
    for y in range(height):
        for col in range(width):
            outside = ((ys - y).abs() > radius) | ((xs - col).abs() > radius)
            expected[:, :, y, col] = (x * outside).sum(dim=(2, 3))
    for sums in (_sum_outside_window_by_products, _sum_outside_window_by_prefix_sums):
        torch.testing.assert_close(sums(x, radius), expected, rtol=1e-12, atol=0)


def test_conv_work_per_token_is_bounded_and_constant_on_large_grids():
    def flops(side):
        q, v = torch.randn(1, side, side, 16), torch.randn(1, side, side, 16)
        k, w = torch.randn(1, side, side, 4), torch.randn(4, 11, 11)
        counter = FlopCounterMode(display=False)
        with counter:
            aft_conv2d(q, k, v, w, method='conv')
        return counter.get_total_flops()
    # above H + W = 2 s^2 the sums outside the window are prefix sums: the work is the convolution's, linear in T
    linear_per_token = flops(256) / 256 ** 2
    assert flops(128) / 128 ** 2 == linear_per_token
    # below, the 0/1 products add H + W <= 2 s^2 multiply-adds a value to the window's s^2: at most 3x as much
    for side in (16, 32, 64, 120):
        assert linear_per_token < flops(side) / side ** 2 <= 3 * linear_per_token


def test_local_window_mask_2d_matches_loops():
    mask = local_window_mask_2d([5, 4], 3, 1, torch.device('cpu'))
    torch.testing.assert_close(mask.double(), window_2d(5, 4, 3, 1))


@pytest.mark.parametrize('call,match', [
    (lambda: aft_full(torch.randn(2, 5, 4), torch.randn(2, 5, 4), torch.randn(2, 6, 4), torch.randn(5, 5)),
     'same'),
    (lambda: aft_full(torch.randn(2, 5, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 4), torch.randn(5, 6)),
     'pos_bias must be'),
    (lambda: aft_full(torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 5)), r'\(B, T, C\)'),
    (lambda: aft_simple(torch.randn(2, 5, 4), torch.randn(2, 5, 3), torch.randn(2, 5, 4)), 'same'),
    (lambda: aft_local(torch.randn(2, 5, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 4), torch.randn(5, 5), 0),
     'window'),
    (lambda: aft_conv2d(torch.randn(1, 4, 4, 6), torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 6),
                        torch.randn(4, 3, 3)), 'divisible'),
    (lambda: aft_conv2d(torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 8),
                        torch.randn(4, 4, 4)), 'odd'),
    (lambda: aft_conv2d(torch.randn(1, 4, 4, 8), torch.randn(1, 4, 5, 4), torch.randn(1, 4, 4, 8),
                        torch.randn(4, 3, 3)), 'k must be'),
    (lambda: aft_conv2d(torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 8),
                        torch.randn(2, 3, 3)), 'weight must be'),
    (lambda: aft_conv2d(torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 8),
                        torch.randn(4, 3, 3), method='fft'), 'method must be'),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
