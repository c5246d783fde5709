"""The aft models as timm models: registry, paper parameter counts, sizes, save/load, and the timm APIs."""
import pytest
import safetensors.torch
import timm
import torch
from timm.optim import create_optimizer_v2

import aft_vit  # noqa: F401  registers the models
from aft_vit.layers import AftConv, AftFull, AftLocal, aft_simple
from aft_vit.models import checkpoint_filter_fn
from tests.reference import naive_aft, window_2d

# The paper's Table 7 (ImageNet-1k, params in millions) and the allowed distance from it
PAPER_PARAMS = {
    'aft_full_tiny': 6.3, 'aft_full_small': 22.6,
    'aft_conv_tiny': 5.4, 'aft_conv_tiny_h192': 5.9,
    'aft_conv_small': 20.3, 'aft_conv_small_h384': 22.5, 'aft_conv_small_k15_h384': 23.0,
    'aft_conv_base_k25': 79.7,
}
IMAGENET_MODELS = sorted(PAPER_PARAMS) + ['aft_simple_tiny', 'aft_simple_small', 'aft_local_tiny', 'aft_local_small',
                                          'aft_conv_tiny_stem16_224']
SMALL_IMAGE_MODELS = {'aft_conv_tiny_patch4_32': 'cifar10', 'aft_conv_tiny_stem4_32': 'cifar10',  # -> default tag
                      'aft_conv_tiny_stem8_32': 'cifar10'}
ALL_MODELS = IMAGENET_MODELS + sorted(SMALL_IMAGE_MODELS)
TOKEN_MODELS = ['aft_full_tiny', 'aft_local_tiny', 'aft_simple_tiny']
SMALL = dict(depth=2)  # architecture kept, fewer blocks: fast tests


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (including AFT-conv's zero-initialized gamma / beta) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def test_registry_holds_every_model_and_no_default_claims_weights():
    """No ImageNet-1k weights exist: every ImageNet-geometry default tag is untrained (the small-data tags are
    opt-in, test_hub.py); a small-image architecture defaults to the weights it was registered for."""
    assert sorted(timm.list_models('aft_*')) == sorted(ALL_MODELS)
    for name in ALL_MODELS:
        cfg = timm.get_pretrained_cfg(name)
        if name in SMALL_IMAGE_MODELS:
            assert cfg.tag == SMALL_IMAGE_MODELS[name] and bool(cfg.has_weights) == (cfg.tag != 'untrained')
        else:
            assert cfg.tag == 'untrained' and not cfg.has_weights
        assert cfg.paper_ids == 'arXiv:2105.14103' and cfg.license and cfg.mean and cfg.std and cfg.crop_pct
        assert cfg.fixed_input_size == (not name.startswith('aft_conv'))
    with pytest.raises(RuntimeError, match='No pretrained weights'):
        timm.create_model('aft_conv_tiny', pretrained=True)


@pytest.mark.parametrize('name', sorted(PAPER_PARAMS))
def test_parameter_counts_match_paper(name):
    model = timm.create_model(name, device='meta')
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    tolerance = 0.25 if name == 'aft_conv_base_k25' else 0.1
    assert abs(millions - PAPER_PARAMS[name]) <= tolerance, f'{name}: {millions:.3f}M vs paper {PAPER_PARAMS[name]}M'


def test_conv_stem_keeps_the_patch_grid():
    """The conv stem variant makes the same tokens as 4 px patches (8 x 8 at 32 px), at any multiple of 4."""
    stem = timm.create_model('aft_conv_tiny_stem4_32', depth=1).eval()
    patch = timm.create_model('aft_conv_tiny_patch4_32', depth=1).eval()
    for size in ((32, 32), (48, 64)):
        x = torch.randn(2, 3, *size)
        assert stem.forward_features(x).shape == patch.forward_features(x).shape == (2, size[0] * size[1] // 16, 192)
    with pytest.raises(ValueError, match='pass patch_size=4'):
        timm.create_model('aft_conv_tiny_stem4_32', patch_size=8)


def test_stride8_stem_makes_8px_patch_tokens():
    """The three-layer stem gives the token grid of 8 px patches (4 x 4 at 32 px), at any multiple of 8."""
    stem = timm.create_model('aft_conv_tiny_stem8_32', depth=1).eval()
    for size in ((32, 32), (48, 64)):
        assert stem.forward_features(torch.randn(2, 3, *size)).shape == (2, size[0] * size[1] // 64, 192)
    with pytest.raises(ValueError, match='pass patch_size=8'):
        timm.create_model('aft_conv_tiny_stem8_32', patch_size=4)


def test_stride16_stem_is_aft_conv_tiny_with_the_study_stem():
    """aft_conv_tiny_stem16_224 is the Imagenette study's aft-stem row (aft_conv_tiny with a four-layer stem), so its
    checkpoints load either way; it makes 16 px patch tokens at any multiple of 16."""
    stem = timm.create_model('aft_conv_tiny_stem16_224', depth=1).eval()
    study_row = timm.create_model('aft_conv_tiny', depth=1, stem_channels=(24, 48, 96, 192))
    assert {k: v.shape for k, v in stem.state_dict().items()} == {k: v.shape for k, v in study_row.state_dict().items()}
    for size in ((128, 128), (96, 160)):
        assert stem.forward_features(torch.randn(1, 3, *size)).shape == (1, size[0] * size[1] // 256, 192)


def test_create_model_arguments():
    model = timm.create_model('aft_conv_tiny', num_classes=7, in_chans=1, drop_path_rate=0.1, **SMALL).eval()
    assert model(torch.randn(2, 1, 64, 96)).shape == (2, 7)
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    model = timm.create_model('aft_full_tiny', img_size=96, **SMALL).eval()
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 1000)
    assert model.pos_embed.shape[1] == 1 + 6 * 6 and model.blocks[0].mixer.pos_bias_u.shape[0] == 1 + 6 * 6
    with pytest.raises(TypeError):
        timm.create_model('aft_conv_tiny', not_an_argument=1)
    model = timm.create_model('aft_local_tiny', device='meta', dtype=torch.float64)
    assert all(p.device.type == 'meta' and p.dtype == torch.float64 for p in model.parameters())


def test_unknown_model_and_bad_images_get_clear_errors():
    with pytest.raises(RuntimeError, match='Unknown model'):
        timm.create_model('aft_conv_huge')
    fixed = timm.create_model('aft_full_tiny', **SMALL)
    with pytest.raises(ValueError, match=r'fixed input size of 224x224, got 256x256.*set_input_size'):
        fixed(torch.randn(1, 3, 256, 256))
    with pytest.raises(ValueError, match='expected 3 input channels, got 1.*in_chans=1'):
        fixed(torch.randn(1, 1, 224, 224))
    conv = timm.create_model('aft_conv_tiny', **SMALL)
    with pytest.raises(ValueError, match='not a multiple of the patch size 16x16'):
        conv(torch.randn(1, 3, 100, 96))
    assert timm.create_model('aft_conv_tiny', dynamic_img_pad=True, **SMALL)(torch.randn(1, 3, 100, 90)).shape == (1, 1000)


def test_conv_runs_at_any_size_without_resampling():
    model = _perturbed(timm.create_model('aft_conv_tiny', **SMALL))
    assert model.pos_embed is None and model.cls_token is None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for height, width in [(32, 32), (96, 160), (224, 224), (320, 128)]:
        tokens = model.forward_features(torch.randn(1, 3, height, width))
        assert tokens.shape == (1, (height // 16) * (width // 16), 192)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_conv_is_translation_equivariant_away_from_borders():
    """Convolutional bias + global sums: shifting a periodic image shifts the tokens (the operator has no position)."""
    model = _perturbed(timm.create_model('aft_conv_tiny', **SMALL))
    tile = torch.randn(1, 3, 16, 16)
    image = tile.repeat(1, 1, 6, 6)  # every patch identical: all tokens must come out equal away from borders
    tokens = model.forward_features(image).reshape(6, 6, -1)
    torch.testing.assert_close(tokens[2, 2], tokens[3, 3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', TOKEN_MODELS)
def test_other_sizes_agree_across_set_input_size_dynamic_and_checkpoint_filter(name):
    source = _perturbed(timm.create_model(name, **SMALL))
    state = source.state_dict()
    x = torch.randn(2, 3, 192, 288)  # 12 x 18 patches, not square

    resized = _perturbed(timm.create_model(name, **SMALL))
    resized.load_state_dict(state)
    resized.set_input_size(img_size=(192, 288))
    dynamic = timm.create_model(name, dynamic_img_size=True, **SMALL).eval()
    dynamic.load_state_dict(state)
    loaded = timm.create_model(name, img_size=(192, 288), **SMALL).eval()
    loaded.load_state_dict(checkpoint_filter_fn(state, loaded))

    expected = resized(x)
    torch.testing.assert_close(dynamic(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dynamic(torch.randn(1, 3, 224, 224)).shape, torch.Size([1, 1000]))


def test_pretrained_file_loads_at_another_size(tmp_path):
    source = _perturbed(timm.create_model('aft_local_tiny', **SMALL))
    path = tmp_path / 'aft_local_tiny.safetensors'
    safetensors.torch.save_file(source.state_dict(), str(path))
    model = timm.create_model(
        'aft_local_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), img_size=160, **SMALL).eval()
    source.set_input_size(img_size=(160, 160))
    x = torch.randn(1, 3, 160, 160)
    torch.testing.assert_close(model(x), source(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['aft_conv_tiny', 'aft_full_tiny', 'aft_local_tiny', 'aft_simple_tiny'])
def test_outputs_unchanged_across_safetensors_save_and_load(name, tmp_path):
    model = _perturbed(timm.create_model(name, **SMALL))
    path = tmp_path / 'model.safetensors'
    safetensors.torch.save_model(model, str(path))
    fresh = timm.create_model(name, **SMALL).eval()
    missing, unexpected = safetensors.torch.load_model(fresh, str(path))
    assert not missing and not unexpected
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_conv_mixer_starts_as_aft_simple():
    """gamma = beta = 0 makes the effective kernel 0, so every head is AFT-simple on its key channel."""
    mixer = AftConv(dim=16, num_heads=4, kernel_size=5).eval()
    x = torch.randn(2, 6 * 5, 16)
    q, k, v = mixer.qkv(x).split([16, 4, 16], dim=-1)
    expected = mixer.proj(aft_simple(q, k.repeat_interleave(4, dim=-1), v))
    torch.testing.assert_close(mixer(x, (6, 5)), expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        mixer.kernel_gamma.fill_(2.)
    assert not torch.allclose(mixer(x, (6, 5)), expected, atol=1e-3)


def test_conv_kernel_reparameterization():
    torch.manual_seed(0)
    mixer = AftConv(dim=8, num_heads=2, kernel_size=3)
    with torch.no_grad():
        mixer.kernel_gamma.copy_(torch.tensor([2., -1.]))
        mixer.kernel_beta.copy_(torch.tensor([.5, 3.]))
    w = mixer.kernel.detach().double()
    # eps inside the square root, as documented: without it a kernel of small variance (9 values) missed by 2e-3
    variance = w.var(dim=(1, 2), unbiased=False, keepdim=True)
    standardized = (w - w.mean(dim=(1, 2), keepdim=True)) / (variance + mixer.eps).sqrt()
    expected = torch.tensor([2., -1.], dtype=torch.float64)[:, None, None] * standardized
    expected = expected + torch.tensor([.5, 3.], dtype=torch.float64)[:, None, None]
    torch.testing.assert_close(mixer.position_kernel().double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('cls', [AftFull, AftLocal])
def test_full_and_local_mixers_match_formula(cls):
    """The mixers' factorized bias u v^T, masked to a 5x5 patch window for AFT-local, class token everywhere."""
    mixer = cls(dim=8, grid_size=(6, 7), num_prefix_tokens=1, bias_rank=4, **({'window': 5} if cls is AftLocal else {}))
    with torch.no_grad():
        mixer.pos_bias_u.normal_()
        mixer.pos_bias_v.normal_()
    mixer = mixer.double()
    x = torch.randn(2, 1 + 42, 8, dtype=torch.float64)
    q, k, v = mixer.qkv(x).chunk(3, dim=-1)
    bias = mixer.pos_bias_u @ mixer.pos_bias_v.t()
    if cls is AftLocal:
        bias = bias * window_2d(6, 7, 5, 1)
    torch.testing.assert_close(mixer(x, (6, 7)), mixer.proj(naive_aft(q, k, v, bias)), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('name', ['aft_conv_tiny', 'aft_full_tiny'])
def test_grad_checkpointing_gives_same_gradients(name):
    model = _perturbed(timm.create_model(name, **SMALL)).train()
    x = torch.randn(2, 3, 224, 224)

    def grads():
        model.zero_grad()
        model(x).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]
    plain = grads()
    model.set_grad_checkpointing(True)
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('name', ['aft_conv_tiny', 'aft_full_tiny'])
def test_features_only_and_intermediates(name):
    size = (96, 160) if name.startswith('aft_conv') else (224, 224)
    model = timm.create_model(name, features_only=True, out_indices=(0, 1), **SMALL).eval()
    feats = model(torch.randn(2, 3, *size))
    assert [f.shape for f in feats] == [torch.Size([2, 192, size[0] // 16, size[1] // 16])] * 2
    assert model.feature_info.channels() == [192, 192] and model.feature_info.reduction() == [16, 16]

    full = _perturbed(timm.create_model(name, **SMALL))
    x = torch.randn(1, 3, *size)
    final, inter = full.forward_intermediates(x, indices=[1], output_fmt='NLC')
    torch.testing.assert_close(final, full.forward_features(x))
    torch.testing.assert_close(full.norm(inter[0][:, :]), final[:, full.num_prefix_tokens:])
    if full.num_prefix_tokens:
        pairs = full.forward_intermediates(x, indices=1, return_prefix_tokens=True, intermediates_only=True)
        assert pairs[0][1].shape == (1, 1, 192)


def test_layer_decay_groups_and_no_weight_decay():
    model = timm.create_model('aft_conv_tiny', **SMALL)
    opt = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scales = sorted({g['lr_scale'] for g in opt.param_groups})
    assert len(scales) == 2 + 2  # stem, 2 blocks, final norm / head
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in opt.param_groups if g['weight_decay'] == 0. for p in g['params']}
    assert {'blocks.0.mixer.kernel', 'blocks.1.mixer.kernel', 'blocks.0.mixer.kernel_gamma'} <= no_decay
    assert 'blocks.0.mixer.qkv.weight' not in no_decay
    full = timm.create_model('aft_full_tiny', **SMALL)
    opt = create_optimizer_v2(full, 'adamw', lr=1e-3, weight_decay=0.05)
    names = {id(p): n for n, p in full.named_parameters()}
    no_decay = {names[id(p)] for g in opt.param_groups if g['weight_decay'] == 0. for p in g['params']}
    assert {'pos_embed', 'cls_token', 'blocks.1.mixer.pos_bias_u', 'blocks.1.mixer.pos_bias_v'} <= no_decay


def test_reset_classifier_and_pooling():
    model = timm.create_model('aft_conv_tiny', **SMALL).eval()
    model.reset_classifier(5)
    assert model.get_classifier().out_features == 5 and model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    model.reset_classifier(0, '')
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 16, 192)
    with pytest.raises(ValueError, match='class token'):
        model.reset_classifier(3, 'token')


@pytest.mark.parametrize('name,size', [('aft_conv_tiny', (96, 160)), ('aft_local_tiny', (224, 224))])
def test_torchscript_and_fx_match_eager(name, size):
    from timm import create_model, set_scriptable
    from torchvision.models.feature_extraction import create_feature_extractor
    with set_scriptable(True):
        model = _perturbed(create_model(name, **SMALL))
    x = torch.randn(2, 3, *size)
    expected = model(x)
    torch.testing.assert_close(torch.jit.script(model)(x), expected, rtol=1e-5, atol=1e-5)
    from timm.models import get_notrace_functions, get_notrace_modules
    fx = create_feature_extractor(
        model, return_nodes=['head'],
        tracer_kwargs={'leaf_modules': get_notrace_modules(), 'autowrap_functions': get_notrace_functions()})
    torch.testing.assert_close(fx(x)['head'], expected, rtol=1e-5, atol=1e-5)


def test_torch_compile_matches_eager():
    model = _perturbed(timm.create_model('aft_conv_tiny', depth=1))
    x = torch.randn(2, 3, 64, 96)
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_meta_construction_then_init_weights():
    model = timm.create_model('aft_conv_tiny', device='meta', **SMALL).to_empty(device='cpu')
    with torch.no_grad():
        for t in model.parameters():
            t.fill_(float('nan'))
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.count_nonzero(model.blocks[0].mixer.kernel_gamma) == 0
    assert torch.isfinite(model(torch.randn(1, 3, 64, 64))).all()
