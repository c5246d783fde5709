"""AFT-conv reuses what it derives from its kernel while the kernel is unchanged, and notices every change;
AFT-full and AFT-local do the same with their exp-space bias.

The reference each time is the same mixer with the cache out of play: under autograd with parameters
that require grad, a mixer recomputes what it derives from them on every call.
"""
import copy
import pickle

import pytest
import torch

from aft_vit.layers import AftConv, AftFull, AftLocal
from aft_vit.layers import functional
from aft_vit.layers.cache import derived_cache
from aft_vit.layers.dense import _dense_ops, _DenseAft, aft_dense_in_chunks, can_overwrite
from aft_vit.layers.functional import (
    _window_index, aft_full, conv_window_weights, full_bias_weights, local_window_mask_2d)

from .reference import naive_aft

GRID = (6, 5)


def _mixer(seed: int = 0, **kwargs) -> AftConv:
    torch.manual_seed(seed)
    mixer = AftConv(dim=16, num_heads=4, kernel_size=5, **kwargs)
    with torch.no_grad():
        mixer.kernel_gamma.uniform_(1., 2.)
        mixer.kernel_beta.uniform_(-1., 1.)
    return mixer.eval()


def _uncached(mixer: AftConv, x: torch.Tensor, grid=GRID) -> torch.Tensor:
    with torch.enable_grad():
        return mixer(x, grid).detach()


def _cached(mixer: AftConv, x: torch.Tensor, grid=GRID) -> torch.Tensor:
    with torch.inference_mode():
        return mixer(x, grid).clone()


def _builds(monkeypatch) -> list:
    """Record every call that derives dense weights from a kernel."""
    calls = []

    def counting(weight, height, width):
        calls.append((height, width))
        return conv_window_weights(weight, height, width)
    monkeypatch.setattr('aft_vit.layers.reuse.conv_window_weights', counting)
    return calls


def test_inference_builds_the_weights_once_per_grid(monkeypatch):
    calls = _builds(monkeypatch)
    mixer, x = _mixer(), torch.randn(2, 30, 16)
    first = _cached(mixer, x)
    for _ in range(3):
        assert torch.equal(_cached(mixer, x), first)
    with torch.no_grad():
        mixer(x, GRID)
    assert calls == [GRID]
    _cached(mixer, torch.randn(1, 12, 16), (3, 4))
    _cached(mixer, x)
    assert calls == [GRID, (3, 4)]  # one entry per grid, both kept
    torch.testing.assert_close(first, _uncached(mixer, x), rtol=1e-6, atol=1e-7)


def _take_a_training_step(mixer, x: torch.Tensor) -> None:
    """One SGD step on every parameter of ``mixer`` (left in eval mode, as found)."""
    optimizer = torch.optim.SGD(mixer.parameters(), lr=0.5)
    mixer.train()
    mixer(x, GRID).square().sum().backward()
    optimizer.step()
    mixer.eval()


def test_an_optimizer_step_is_noticed():
    mixer, x = _mixer(), torch.randn(2, 30, 16)
    before = _cached(mixer, x)
    _take_a_training_step(mixer, x)
    after = _cached(mixer, x)
    assert not torch.allclose(after, before, atol=1e-4)
    torch.testing.assert_close(after, _uncached(mixer, x), rtol=1e-6, atol=1e-7)


def test_load_state_dict_is_noticed():
    mixer, other, x = _mixer(0), _mixer(1), torch.randn(2, 30, 16)
    before = _cached(mixer, x)
    mixer.load_state_dict(other.state_dict())
    after = _cached(mixer, x)
    assert not torch.allclose(after, before, atol=1e-4)
    torch.testing.assert_close(after, _cached(other, x), rtol=0, atol=0)


@pytest.mark.parametrize('change', ['float64', 'bfloat16 and back', 'new parameter'])
def test_moving_or_replacing_the_weights_is_noticed(change):
    mixer, x = _mixer(), torch.randn(2, 30, 16)
    _cached(mixer, x)
    if change == 'float64':
        mixer.to(torch.float64)
        x = x.double()
    elif change == 'bfloat16 and back':
        mixer.to(torch.bfloat16).to(torch.float32)  # rounds every weight: the old weights no longer hold
    else:
        mixer.kernel_gamma = torch.nn.Parameter(mixer.kernel_gamma.detach() * 3)
    torch.testing.assert_close(_cached(mixer, x), _uncached(mixer, x), rtol=1e-6, atol=1e-7)


def test_the_cache_adds_no_state_and_copies_start_empty():
    mixer, x = _mixer(), torch.randn(2, 30, 16)
    keys = set(mixer.state_dict())
    _cached(mixer, x)
    assert set(mixer.state_dict()) == keys
    assert derived_cache(mixer.kernel)._entries
    for clone in (copy.deepcopy(mixer), pickle.loads(pickle.dumps(mixer))):
        assert not derived_cache(clone.kernel)._entries
        torch.testing.assert_close(_cached(clone, x), _cached(mixer, x), rtol=0, atol=0)


def test_training_recomputes_and_the_kernel_gets_gradients(monkeypatch):
    calls = _builds(monkeypatch)
    mixer, x = _mixer().train(), torch.randn(2, 30, 16)
    for _ in range(2):
        mixer(x, GRID).sum().backward()
    assert calls == []  # the training path derives its weights inside aft_conv2d, from the live kernel
    assert mixer.kernel.grad is not None and mixer.kernel_gamma.grad.abs().sum() > 0


def test_frozen_weights_with_input_gradients_reuse_the_cache():
    mixer, x = _mixer(), torch.randn(2, 30, 16, requires_grad=True)
    mixer.requires_grad_(False)
    mixer(x, GRID).sum().backward()  # cached weights saved for backward: built outside inference mode
    expected = x.grad.clone()
    x.grad = None
    mixer.requires_grad_(True)
    mixer(x, GRID).sum().backward()
    torch.testing.assert_close(x.grad, expected, rtol=1e-6, atol=1e-7)


def test_compiled_training_with_a_frozen_kernel_gets_the_projections_gradients():
    """A frozen kernel with trained projections, compiled: the gradients reach qkv and proj as in eager code (the
    operator that serves a frozen kernel in compiled inference has no backward, so it must not be called here)."""
    mixer, x = _mixer(), torch.randn(2, 30, 16)
    for p in mixer._kernel_params():
        p.requires_grad_(False)
    mixer.train()
    mixer(x, GRID).square().sum().backward()
    expected = [mixer.qkv.weight.grad.clone(), mixer.proj.weight.grad.clone()]
    mixer.zero_grad()
    torch.compile(mixer, fullgraph=True)(x, GRID).square().sum().backward()
    for got, want in zip([mixer.qkv.weight.grad, mixer.proj.weight.grad], expected):
        assert got is not None
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_reusing_operator_refuses_to_backpropagate():
    """Called with inputs that record gradients, the compiled-inference operator says it has no backward instead
    of passing none."""
    mixer = _mixer()
    q, k, v = torch.randn(2, *GRID, 16 * 2 + 4, requires_grad=True).split([16, 4, 16], dim=-1)
    frozen = [p.detach() for p in mixer._kernel_params()]
    out = torch.ops.aft_vit.conv2d_reusing_kernel(q, k, v, *frozen, mixer.eps)
    with pytest.raises(RuntimeError, match='no backward'):
        out.sum().backward()


def test_the_window_index_is_built_once_per_grid():
    functional._cached_window_index.cache_clear()
    weight = torch.randn(4, 5, 5, requires_grad=True)
    for _ in range(3):
        conv_window_weights(weight, 6, 5).sum().backward()
    info = functional._cached_window_index.cache_info()
    assert (info.misses, info.hits) == (1, 2)


@pytest.mark.parametrize('heads,shared', [(4, False), (8, True), (1, False)])
def test_hand_written_backward_matches_autograd(heads, shared):
    """The dense Function's forward and backward against the same math in plain ops (TorchScript's path)."""
    g = torch.Generator().manual_seed(0)
    batch, tokens, channels = 2, 7, 8
    q, v = (torch.randn(batch, tokens, channels, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    k = (torch.randn(batch, tokens, heads, generator=g, dtype=torch.float64) * 3).requires_grad_()
    w = torch.rand(1 if shared else heads, tokens, tokens, generator=g, dtype=torch.float64).add(.01)
    w.requires_grad_()
    grad = torch.randn(batch, tokens, channels, generator=g, dtype=torch.float64)
    results = []
    for fn in (_DenseAft.apply, _dense_ops):
        out = fn(q, k, v, w)
        results.append((out, *torch.autograd.grad(out, (q, k, v, w), grad)))
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('heads,shared', [(4, False), (8, True), (1, False)])
def test_inference_overwriting_in_batch_chunks_matches_the_formula(heads, shared, monkeypatch):
    """The in-place inference path, given views of one fused qkv tensor as the mixers give it, in chunks of two
    images and a last one of one, against the literal formula per head (float64)."""
    monkeypatch.setattr('aft_vit.layers.dense.INFERENCE_CHUNK_BYTES', 2 * 7 * (8 // heads + 1) * heads * 8)
    g = torch.Generator().manual_seed(0)
    batch, tokens, channels = 5, 7, 8
    fused = torch.randn(batch, tokens, 2 * channels + heads, generator=g, dtype=torch.float64)
    fused[..., channels:channels + heads] *= 3
    bias = torch.randn(1 if shared else heads, tokens, tokens, generator=g, dtype=torch.float64)  # (query, key)
    q, k, v = (t.clone() for t in fused.split([channels, heads, channels], dim=-1))
    head_dim = channels // heads
    expected = torch.cat([
        naive_aft(q[..., i * head_dim:(i + 1) * head_dim], k[..., i:i + 1].expand(-1, -1, head_dim),
                  v[..., i * head_dim:(i + 1) * head_dim], bias[0 if shared else i]) for i in range(heads)], dim=-1)
    assert can_overwrite(*fused.split([channels, heads, channels], dim=-1))
    out = aft_dense_in_chunks(*fused.split([channels, heads, channels], dim=-1), bias.exp().transpose(1, 2),
                              overwrite=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    assert out.is_contiguous() and out.shape == (batch, tokens, channels)


def test_only_projections_without_gradients_in_the_products_dtype_are_overwritten():
    q, v = torch.randn(2, 7, 8), torch.randn(2, 7, 8)
    k = torch.randn(2, 7, 4, requires_grad=True)
    assert not can_overwrite(q, k, v)  # autograd records k
    with torch.no_grad():
        assert can_overwrite(q, k, v)
        assert not can_overwrite(q.bfloat16(), k.bfloat16(), v.bfloat16())  # bfloat16 autocast's projections


@pytest.mark.parametrize('kind', ['conv', 'full', 'local'])
def test_mixers_in_inference_overwrite_only_their_own_projections(kind, monkeypatch):
    """A batch of five, one image per chunk: the mixer's output as under autograd, and the caller's input untouched."""
    monkeypatch.setattr('aft_vit.layers.dense.INFERENCE_CHUNK_BYTES', 1)
    mixer = _mixer() if kind == 'conv' else _bias_mixer({'full': AftFull, 'local': AftLocal}[kind])
    x = torch.randn(5, 30 if kind == 'conv' else 31, 16)
    before = x.clone()
    torch.testing.assert_close(_cached(mixer, x), _uncached(mixer, x), rtol=1e-6, atol=1e-7)
    assert torch.equal(x, before)


@pytest.mark.parametrize('kind', ['conv', 'full'])
def test_a_kept_qkv_output_is_not_overwritten(kind):
    """A forward hook that keeps the qkv projection's output (feature extraction) gets it as computed."""
    mixer = _mixer() if kind == 'conv' else _bias_mixer(AftFull)
    x = torch.randn(2, 30 if kind == 'conv' else 31, 16)
    kept = []
    handle = mixer.qkv.register_forward_hook(lambda module, args, out: kept.append(out))
    _cached(mixer, x)
    handle.remove()
    torch.testing.assert_close(kept[0], mixer.qkv(x.reshape(kept[0].shape[:-1] + (16,))), rtol=0, atol=0)


def _bias_mixer(cls, seed: int = 0):
    """An AFT-full / AFT-local mixer with a class token and bias factors far from their near-zero init, so that a
    stale bias would show in the output."""
    torch.manual_seed(seed)
    kwargs = {'window': 3} if cls is AftLocal else {}
    mixer = cls(dim=16, grid_size=GRID, num_prefix_tokens=1, bias_rank=4, **kwargs)
    with torch.no_grad():
        mixer.pos_bias_u.normal_()
        mixer.pos_bias_v.normal_()
    return mixer.eval()


@pytest.mark.parametrize('cls', [AftFull, AftLocal])
def test_full_and_local_build_their_bias_once_per_grid(cls, monkeypatch):
    calls = []

    def counting(pos_bias):
        calls.append(pos_bias.shape[0])
        return full_bias_weights(pos_bias)
    monkeypatch.setattr('aft_vit.layers.mixers.full_bias_weights', counting)
    mixer, x = _bias_mixer(cls), torch.randn(2, 31, 16)
    first = _cached(mixer, x)
    for _ in range(2):
        assert torch.equal(_cached(mixer, x), first)
    _cached(mixer, torch.randn(1, 13, 16), (3, 4))  # another grid: the factors resampled, a second entry
    _cached(mixer, x)
    assert calls == [31, 13]
    torch.testing.assert_close(first, _uncached(mixer, x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('cls', [AftFull, AftLocal])
def test_full_and_local_notice_a_step_a_load_and_a_move(cls):
    mixer, x = _bias_mixer(cls), torch.randn(2, 31, 16)
    before = _cached(mixer, x)
    _take_a_training_step(mixer, x)
    stepped = _cached(mixer, x)
    assert not torch.allclose(stepped, before, atol=1e-4)
    torch.testing.assert_close(stepped, _uncached(mixer, x), rtol=1e-6, atol=1e-7)
    other = _bias_mixer(cls, seed=1)
    mixer.load_state_dict(other.state_dict())
    torch.testing.assert_close(_cached(mixer, x), _cached(other, x), rtol=0, atol=0)
    mixer.to(torch.float64)
    torch.testing.assert_close(_cached(mixer, x.double()), _uncached(mixer, x.double()), rtol=1e-12, atol=1e-14)
    assert derived_cache(mixer.pos_bias_u)._entries  # filled, yet the state dict holds what an unused mixer's holds
    assert set(mixer.state_dict()) == set(_bias_mixer(cls).state_dict())
    assert not derived_cache(copy.deepcopy(mixer).pos_bias_u)._entries


@pytest.mark.parametrize('cls', [AftFull, AftLocal])
def test_a_bias_above_the_limit_is_rebuilt_not_kept(cls, monkeypatch):
    monkeypatch.setattr('aft_vit.layers.mixers.CACHED_WEIGHTS_LIMIT', 30 * 30)  # T = 31 tokens: just above
    mixer, x = _bias_mixer(cls), torch.randn(2, 31, 16)
    first = _cached(mixer, x)
    assert not derived_cache(mixer.pos_bias_u)._entries
    torch.testing.assert_close(first, _uncached(mixer, x), rtol=0, atol=0)
    monkeypatch.setattr('aft_vit.layers.mixers.CACHED_WEIGHTS_LIMIT', 31 * 31)
    _cached(mixer, x)
    assert derived_cache(mixer.pos_bias_u)._entries


@pytest.mark.parametrize('cls', [AftFull, AftLocal])
def test_a_bias_built_under_autocast_is_the_full_precision_one(cls):
    """The rank-r product would run in bfloat16 under autocast: the cache builds outside it, so the entry does not
    depend on which call came first."""
    mixer, x = _bias_mixer(cls), torch.randn(2, 31, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        _cached(mixer, x)
    torch.testing.assert_close(_cached(mixer, x), _cached(_bias_mixer(cls), x), rtol=0, atol=0)


def test_the_local_window_mask_is_built_once_per_grid_in_training():
    functional.cached_local_window_mask_2d.cache_clear()
    mixer, x = _bias_mixer(AftLocal).train(), torch.randn(2, 31, 16)
    for _ in range(3):
        mixer(x, GRID).sum().backward()
    info = functional.cached_local_window_mask_2d.cache_info()
    assert (info.misses, info.hits) == (1, 2)
    expected = aft_full(*mixer._project_in(x), mixer.pos_bias_u @ mixer.pos_bias_v.t() * local_window_mask_2d(
        list(GRID), 3, 1, x.device))
    torch.testing.assert_close(mixer(x, GRID), mixer._project_out(expected))


def test_compiled_inference_reuses_the_weights_and_notices_a_step(monkeypatch):
    """Under torch.compile (one graph: fullgraph) the mixer reaches its cache through an opaque operator."""
    calls = _builds(monkeypatch)
    mixer, x = _mixer(), torch.randn(2, 30, 16)
    compiled = torch.compile(mixer, fullgraph=True)
    with torch.inference_mode():
        first = compiled(x, GRID)
        for _ in range(2):
            assert torch.equal(compiled(x, GRID), first)
    assert calls == [GRID]
    torch.testing.assert_close(first, _uncached(mixer, x), rtol=1e-6, atol=1e-7)
    _take_a_training_step(mixer, x)
    with torch.inference_mode():
        after = compiled(x, GRID)
    assert calls == [GRID, GRID]
    torch.testing.assert_close(after, _uncached(mixer, x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('heads,shared', [(4, False), (8, True)])
def test_the_compiled_dense_operators_are_consistent(heads, shared):
    """torch.library's own checks of the operators torch.compile calls: schema, fake (shapes, strides) against
    real, and the registered backward against the Function's."""
    g = torch.Generator().manual_seed(0)
    q, v = (torch.randn(2, 7, 8, generator=g, requires_grad=True) for _ in range(2))
    k = torch.randn(2, 7, heads, generator=g, requires_grad=True)
    w = torch.rand(1 if shared else heads, 7, 7, generator=g).add(.01).requires_grad_()
    torch.library.opcheck(torch.ops.aft_vit.dense_forward.default, (q, k, v, w))
    mixer = _mixer()
    qkv = torch.randn(2, *GRID, 16 * 2 + 4, generator=g).split([16, 4, 16], dim=-1)
    frozen = [p.detach() for p in mixer._kernel_params()]  # the operator serves parameters that get no gradient
    torch.library.opcheck(torch.ops.aft_vit.conv2d_reusing_kernel.default, (*qkv, *frozen, mixer.eps))
    grad = torch.randn(2, 7, 8, generator=g)
    out = torch.ops.aft_vit.dense_forward(q, k, v, w)[0]
    ours = torch.autograd.grad(out, (q, k, v, w), grad)
    reference = torch.autograd.grad(_DenseAft.apply(q, k, v, w), (q, k, v, w), grad)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_compiled_window_weight_operators_gather_and_sum_back_as_index_select_does():
    """The (h, T, T) weights compiled training gathers from the kernel's table, and their gradient summed back into
    it: torch.library's checks of both operators, and float64 values and gradients against plain index_select."""
    g = torch.Generator().manual_seed(0)
    height, width, kernel_size = 5, 6, 3
    table = torch.rand(4, kernel_size * kernel_size + 1, generator=g, dtype=torch.float64).requires_grad_()
    torch.library.opcheck(torch.ops.aft_vit.window_weights.default, (table, height, width, kernel_size))
    grad = torch.randn(4, 30, 30, generator=g, dtype=torch.float64)
    torch.library.opcheck(torch.ops.aft_vit.window_weights_backward.default, (grad, height, width, kernel_size))
    ours = torch.ops.aft_vit.window_weights(table, height, width, kernel_size)
    index = _window_index(height, width, kernel_size, table.device)
    reference = table.index_select(1, index).view(4, 30, 30)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    ours_grad, = torch.autograd.grad(ours, table, grad)
    reference_grad, = torch.autograd.grad(reference, table, grad)
    torch.testing.assert_close(ours_grad, reference_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('cls', [AftConv, AftFull])
def test_compiled_training_gets_the_hand_written_backward_right(cls):
    """Compiled training runs the dense product and its backward as operators: same gradients as eager."""
    mixer = _mixer() if cls is AftConv else _bias_mixer(cls)
    x = torch.randn(2, 30 if cls is AftConv else 31, 16)
    compiled = torch.compile(copy.deepcopy(mixer).train(), fullgraph=True)
    mixer.train()
    for module in (mixer, compiled):
        module(x, GRID).square().sum().backward()
    for ours, reference in zip(compiled.parameters(), mixer.parameters()):
        torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-4, atol=1e-5)
