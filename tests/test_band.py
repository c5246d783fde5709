"""AFT-conv's banded product (inference at batch 1 in the tiny layout) against the literal formula in float64, its
weights against the dense ones entry by entry, and the mixer's choice of it. The product takes channel-major inputs
(C, B, H, W), as the mixer's channel-major projection gives them."""
import pytest
import torch

from aft_vit.layers import AftConv, conv_window_weights
from aft_vit.layers.band import aft_conv2d_band, band_is_cheaper, conv_band_weights
from aft_vit.layers.cache import derived_cache
from aft_vit.layers.dense import aft_dense_in_chunks
from tests.reference import naive_aft, naive_aft_conv2d
from tests.test_operators import EXACT, MAGNITUDES, _grid


def _band(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """:func:`aft_conv2d_band` on (B, H, W, C) inputs, its (C, B, H, W) output seen as (B, H, W, C)."""
    out = aft_conv2d_band(q.permute(3, 0, 1, 2), k.permute(3, 0, 1, 2), v.permute(3, 0, 1, 2), weights)
    return out.permute(1, 2, 3, 0)


@pytest.mark.parametrize('std,offset', MAGNITUDES)
@pytest.mark.parametrize('batch,height,width,size', [
    (1, 7, 6, 5), (2, 1, 9, 5), (3, 9, 2, 3), (1, 12, 13, 15), (2, 5, 5, 1), (1, 14, 14, 11)])
def test_band_matches_formula(std, offset, batch, height, width, size):
    q, k, v, w = _grid(batch=batch, height=height, width=width, size=size, std=std, offset=offset)
    out = _band(q, k, v, conv_band_weights(w, height, width))
    torch.testing.assert_close(out, naive_aft_conv2d(q, k, v, w), **EXACT)


def test_band_reads_rows_of_one_channel_major_projection_and_leaves_them_unchanged():
    q, k, v, w = _grid(batch=1, height=6, width=5, size=3, std=3.)
    fused = torch.cat([q, k, v], dim=-1).permute(3, 0, 1, 2).contiguous()  # (2 C + h, B, H, W)
    before = fused.clone()
    out = aft_conv2d_band(*fused.split([8, 4, 8], dim=0), conv_band_weights(w, 6, 5))
    torch.testing.assert_close(out.permute(1, 2, 3, 0), naive_aft_conv2d(q, k, v, w), **EXACT)
    assert torch.equal(fused, before) and out.is_contiguous() and out.shape == (8, 1, 6, 5)


@pytest.mark.parametrize('height,width,size', [(6, 5, 3), (4, 9, 5), (3, 3, 7)])
def test_band_weights_are_the_dense_weights_entry_by_entry(height, width, size):
    """[x, (dy, x')] is the dense weight of key (y + dy - r, x') for query (y, x) at every y whose window holds that
    row; the last column is the weight of every key in a row outside the window."""
    w = _grid(size=size, std=3.)[3]
    band, dense = conv_band_weights(w, height, width), conv_window_weights(w, height, width)
    radius = size // 2
    for y in range(height):
        for x in range(width):
            for y2 in range(height):
                for x2 in range(width):
                    column = (y2 - y + radius) * width + x2 if abs(y2 - y) <= radius else -1
                    assert torch.equal(band[:, x, column], dense[:, y2 * width + x2, y * width + x])


def test_band_rule_picks_batch_1_in_the_tiny_layout():
    """aft_conv_tiny at 224 px (14 x 14 tokens, kernel 11, 6 channels a head) at batch 1, not 2; the 16-head
    layout (24 channels a head) not at 224 px but at 20 x 20 tokens; a grid narrower than the kernel never."""
    assert band_is_cheaper(1, 14, 14, 11, 6)
    assert not band_is_cheaper(2, 14, 14, 11, 6)
    assert not band_is_cheaper(1, 14, 14, 11, 24) and band_is_cheaper(1, 20, 20, 11, 24)
    assert not band_is_cheaper(1, 7, 7, 11, 6)


def test_band_under_bfloat16_autocast_is_finite_and_close():
    q, k, v, w = _grid(batch=1, height=6, width=5, size=3, dtype=torch.float32)
    band = conv_band_weights(w, 6, 5)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = _band(q.bfloat16(), k.bfloat16(), v.bfloat16(), band)
    assert out.dtype == torch.bfloat16 and out.isfinite().all()
    torch.testing.assert_close(out.float(), naive_aft_conv2d(q, k, v, w).float(), rtol=0.05, atol=0.05)


def _tiny_layout_mixer() -> AftConv:
    """Two channels a head: the band rule takes the banded product on a 6 x 5 grid with kernel 5 at batch 1."""
    torch.manual_seed(0)
    mixer = AftConv(dim=16, num_heads=8, kernel_size=5)
    with torch.no_grad():
        mixer.kernel_gamma.uniform_(1., 2.)
        mixer.kernel_beta.uniform_(-1., 1.)
    return mixer.eval()


def test_mixer_takes_the_band_at_small_batches_in_inference_only():
    mixer = _tiny_layout_mixer()
    assert band_is_cheaper(1, 6, 5, 5, 2) and not band_is_cheaper(4, 6, 5, 5, 2)
    x = torch.randn(4, 30, 16)
    for batch in (1, 4):
        with torch.enable_grad():
            expected = mixer(x[:batch], (6, 5)).detach()  # autograd: the live kernel, no cache
        with torch.inference_mode():
            torch.testing.assert_close(mixer(x[:batch], (6, 5)), expected, rtol=1e-6, atol=1e-7)
    assert set(derived_cache(mixer.kernel)._entries) == {('kernel', mixer.eps), ('band', 6, 5), ('dense', 6, 5)}


def test_mixer_band_notices_a_step():
    mixer, x = _tiny_layout_mixer(), torch.randn(1, 30, 16)
    with torch.inference_mode():
        before = mixer(x, (6, 5))
    with torch.no_grad():
        mixer.kernel_beta.add_(1.)
    with torch.inference_mode():
        after = mixer(x, (6, 5))
    with torch.enable_grad():
        expected = mixer(x, (6, 5)).detach()
    assert not torch.allclose(after, before, atol=1e-4)
    torch.testing.assert_close(after, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('overwrite', [False, True])
def test_dense_in_chunks_overwrites_k_only_when_asked(overwrite, monkeypatch):
    """Chunks of two images and a last one of one, against the formula per head; q and v are never written, k only
    with ``overwrite``."""
    monkeypatch.setattr('aft_vit.layers.dense.INFERENCE_CHUNK_BYTES', 2 * 7 * 3 * 4 * 8)
    g = torch.Generator().manual_seed(0)
    fused = torch.randn(5, 7, 8 + 4 + 8, generator=g, dtype=torch.float64)
    bias = torch.randn(4, 7, 7, generator=g, dtype=torch.float64)  # (query, key)
    before = fused.clone()
    q, k, v = before.split([8, 4, 8], dim=-1)
    expected = torch.cat([naive_aft(q[..., 2 * i:2 * i + 2], k[..., i:i + 1].expand(-1, -1, 2), v[..., 2 * i:2 * i + 2],
                                    bias[i]) for i in range(4)], dim=-1)
    out = aft_dense_in_chunks(*fused.split([8, 4, 8], dim=-1), bias.exp().transpose(1, 2), overwrite=overwrite)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    unchanged = torch.isclose(fused, before, rtol=0, atol=0).all(dim=(0, 1))
    assert unchanged[:8].all() and unchanged[12:].all()
    assert unchanged[8:12].all() != overwrite
