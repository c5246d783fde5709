"""AFT-conv's channel-major inference (its projections computed transposed, the products on (C, B, H, W) rows):
taken only where it may be, the same output as the token-major path (which records gradients and recomputes its
kernel), the caller's input untouched, the dense product against the formula per head, and the same under
torch.compile."""
import pytest
import torch

from aft_vit.layers import AftConv, dense_is_cheaper
from aft_vit.layers.cache import derived_cache
from aft_vit.layers.dense import aft_dense_channel_major
from tests.reference import naive_aft

GRID = (6, 5)


def _mixer(num_heads: int = 4, qkv_bias: bool = True) -> AftConv:
    torch.manual_seed(0)
    mixer = AftConv(dim=16, num_heads=num_heads, kernel_size=5, qkv_bias=qkv_bias)
    with torch.no_grad():
        mixer.kernel_gamma.uniform_(1., 2.)
        mixer.kernel_beta.uniform_(-1., 1.)
    return mixer.eval()


def _token_major(mixer: AftConv, x: torch.Tensor, grid=GRID) -> torch.Tensor:
    with torch.enable_grad():  # parameters that require grad: the token-major path, no cache
        return mixer(x, grid).detach()


def _spy(monkeypatch) -> list:
    """Record the batch of every channel-major forward."""
    calls = []
    original = AftConv._forward_channel_major

    def spying(self, x, feat_size):
        calls.append(x.shape[0])
        return original(self, x, feat_size)
    monkeypatch.setattr(AftConv, '_forward_channel_major', spying)
    return calls


@pytest.mark.parametrize('num_heads,batch,qkv_bias,product', [
    (8, 1, True, 'band'), (4, 3, True, 'dense'), (8, 1, False, 'band'), (4, 3, False, 'dense')])
def test_inference_is_channel_major_and_matches_the_token_major_path(num_heads, batch, qkv_bias, product,
                                                                     monkeypatch):
    calls = _spy(monkeypatch)
    mixer = _mixer(num_heads, qkv_bias).double()
    x = torch.randn(batch, 30, 16, dtype=torch.float64)
    before = x.clone()
    with torch.inference_mode():
        out = mixer(x, GRID)
    assert calls == [batch] and (product, *GRID) in derived_cache(mixer.kernel)._entries
    assert torch.equal(x, before)
    torch.testing.assert_close(out, _token_major(mixer, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('overwrite', [False, True])
def test_dense_product_in_chunks_against_the_formula(overwrite, monkeypatch):
    """Chunks of two images and a last one of one; q and v are never written, k only with ``overwrite``."""
    monkeypatch.setattr('aft_vit.layers.dense.INFERENCE_CHUNK_BYTES', 2 * 7 * 3 * 4 * 8)
    g = torch.Generator().manual_seed(0)
    fused = torch.randn(8 + 4 + 8, 5, 7, generator=g, dtype=torch.float64)  # (2 C + h, B, T) rows
    bias = torch.randn(4, 7, 7, generator=g, dtype=torch.float64)  # (query, key)
    before = fused.clone()
    q, k, v = (rows.permute(1, 2, 0) for rows in before.split([8, 4, 8], dim=0))  # (B, T, channels)
    expected = torch.cat([naive_aft(q[..., 2 * i:2 * i + 2], k[..., i:i + 1].expand(-1, -1, 2), v[..., 2 * i:2 * i + 2],
                                    bias[i]) for i in range(4)], dim=-1)
    out = aft_dense_channel_major(*fused.split([8, 4, 8], dim=0), bias.exp().transpose(1, 2), overwrite=overwrite)
    assert out.shape == (8, 5, 7) and out.is_contiguous()
    torch.testing.assert_close(out.permute(1, 2, 0), expected, rtol=1e-10, atol=1e-12)
    unchanged = torch.isclose(fused, before, rtol=0, atol=0).all(dim=(1, 2))
    assert unchanged[:8].all() and unchanged[12:].all()
    assert unchanged[8:12].all() != overwrite


def _hooked(mixer: AftConv, x: torch.Tensor) -> torch.Tensor:
    handle = mixer.qkv.register_forward_hook(lambda module, args, out: None)
    try:
        with torch.inference_mode():
            return mixer(x, GRID)
    finally:
        handle.remove()


def _under_autocast(mixer: AftConv, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16):
        return mixer(x, GRID)


def _recording_gradients(mixer: AftConv, x: torch.Tensor) -> torch.Tensor:
    mixer.kernel.requires_grad_(False)  # a frozen kernel, trained projections: the token-major reusing path
    return mixer(x, GRID)


@pytest.mark.parametrize('call', [_hooked, _under_autocast, _recording_gradients])
def test_token_major_under_a_hook_autocast_or_gradients(call, monkeypatch):
    calls = _spy(monkeypatch)
    mixer, x = _mixer(), torch.randn(2, 30, 16)
    out = call(mixer, x)
    assert calls == []
    tolerance = 0.05 if out.dtype != x.dtype else 1e-6
    torch.testing.assert_close(out.float(), _token_major(_mixer(), x), rtol=tolerance, atol=tolerance)


class _DoubledLinear(torch.nn.Linear):
    """A layer that adapts ``nn.Linear`` (as a LoRA wrapper would): its output is not its weight's product."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_token_major_where_qkv_is_not_a_plain_linear(monkeypatch):
    calls = _spy(monkeypatch)
    mixer, x = _mixer(), torch.randn(2, 30, 16)
    plain = _token_major(mixer, x)
    adapted = _DoubledLinear(16, 36)
    adapted.load_state_dict(mixer.qkv.state_dict())
    mixer.qkv = adapted
    with torch.inference_mode():
        out = mixer(x, GRID)
    assert calls == [] and not torch.allclose(out, plain, atol=1e-3)
    torch.testing.assert_close(out, _token_major(mixer, x), rtol=1e-6, atol=1e-6)


def test_token_major_on_grids_of_the_convolution_path(monkeypatch):
    calls = _spy(monkeypatch)
    mixer, grid = _mixer(), (24, 24)
    assert not dense_is_cheaper(24 * 24, 5, 4)
    x = torch.randn(1, 24 * 24, 16)
    with torch.inference_mode():
        out = mixer(x, grid)
    assert calls == []
    torch.testing.assert_close(out, _token_major(mixer, x, grid), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('num_heads,batch', [(8, 1), (4, 3)])
def test_compiled_inference_calls_the_channel_major_operator(num_heads, batch):
    mixer, x = _mixer(num_heads), torch.randn(batch, 30, 16)
    compiled = torch.compile(mixer, fullgraph=True)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x, GRID), _token_major(mixer, x), rtol=1e-5, atol=1e-6)
    rows = torch.randn(16 + num_heads + 16, batch, *GRID).split([16, num_heads, 16], dim=0)
    frozen = [p.detach() for p in mixer._kernel_params()]
    torch.library.opcheck(torch.ops.aft_vit.conv2d_channel_major.default, (*rows, *frozen, mixer.eps))
