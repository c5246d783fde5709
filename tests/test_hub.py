"""Publishing (aft-vit publish), loading back every way timm loads weights, and converting DeiT checkpoints.

The Hub paths run against a real Hub-compatible server on 127.0.0.1 (olah, tests/hub_server.py) with an empty
HF_HOME, so huggingface_hub's real download, cache and offline-reuse code runs.
"""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import yaml

import aft_vit  # noqa: F401
from aft_vit.errors import PretrainedWeightsError
from aft_vit.hub import SUMS_FILE, sha256_of
from tests.hub_server import HubServer
from tests.test_training import _aft_vit, small_model

ROOT = Path(__file__).resolve().parent.parent
X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
PUBLISH = ['--dataset-name', 'CIFAR-10 (JPEG q75 copy), 320-image subset', '--dataset-id', 'cifar10', '--split', 'test',
           '-j', 0]


def _reference(checkpoint: Path, ema: bool = False) -> torch.nn.Module:
    """The model a checkpoint describes, built directly (not through any hub path)."""
    ckpt = torch.load(checkpoint, weights_only=True)
    a = ckpt['args']
    model = timm.create_model(a['model'], num_classes=a['num_classes'], **dict(dict(img_size=a['img_size']), **a['model_kwargs']))
    model.load_state_dict(ckpt['state_dict_ema' if ema else 'state_dict'])
    return model.eval()


@pytest.fixture(scope='module')
def checkpoint(cifar_tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('hubtrain')
    _aft_vit('train', '--data-dir', cifar_tiny, *small_model(1), '-b', 32, '--epochs', 1, '--lr', 1e-3,
             '--no-aug', '--model-ema', '--model-ema-decay', 0.5, '--output', out, '--experiment', 'r',
             '--no-progress', '-j', 0)
    return out / 'r' / 'last.pth.tar'


@pytest.fixture(scope='module')
def published(checkpoint, cifar_tiny, tmp_path_factory) -> Path:
    weights = tmp_path_factory.mktemp('weights')
    _aft_vit('publish', '--checkpoint', checkpoint, '--tag', 'olahtest', '--data-dir', cifar_tiny, *PUBLISH,
             '--output', weights, '--extra-img-sizes', 48)
    return weights / 'aft_conv_tiny_patch4_32.olahtest'


def test_publish_writes_timm_hub_folder(published, checkpoint, cifar_tiny, tmp_path):
    assert sorted(p.name for p in published.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((published / 'config.json').read_text())
    classes = sorted(p.name for p in (cifar_tiny / 'train').iterdir())
    assert config['architecture'] == 'aft_conv_tiny_patch4_32' and config['num_classes'] == 10
    assert config['label_names'] == classes
    # model_args: architecture arguments only (num_classes / global_pool are top-level fields), the real tag
    assert config['model_args']['depth'] == 1 and not {'num_classes', 'global_pool', 'in_chans'} & set(config['model_args'])
    pcfg = config['pretrained_cfg']
    assert pcfg['tag'] == 'olahtest'
    assert 'description' not in pcfg  # an unregistered tag: the model's default tag describes other weights
    assert pcfg['input_size'] == [3, 32, 32] and pcfg['crop_pct'] == 1.0
    assert pcfg['mean'] == pytest.approx([0.4914, 0.4822, 0.4465]) and pcfg['std'] == pytest.approx([0.247, 0.2435, 0.2616])
    # EMA weights are what gets published when the checkpoint has them
    published_sd = safetensors.torch.load_file(published / 'model.safetensors')
    ema = _reference(checkpoint, ema=True).state_dict()
    assert all(torch.equal(published_sd[k], ema[k]) for k in ema)

    sums = (published.parent / SUMS_FILE).read_text().split()
    assert sums == [sha256_of(published / 'model.safetensors'), 'aft_conv_tiny_patch4_32.olahtest/model.safetensors']
    card = (published / 'README.md').read_text()
    front = yaml.safe_load(card.split('---')[1])
    assert front['library_name'] == 'timm' and front['license'] and front['datasets'] == ['cifar10']
    assert 'accuracy' in front['metrics'] and 'image-classification' in front['tags']
    assert 'CIFAR-10 (JPEG q75 copy)' in card and 'import aft_vit' in card and '2105.14103' in card
    assert 'aft-vit train ' in card  # the exact training command, recorded by the training run
    _aft_vit('eval', '--checkpoint', checkpoint, '--use-ema', '--data-dir', cifar_tiny, '--split', 'test',
             '--json', tmp_path / 'e.json', '--no-progress', '-j', 0)
    top1 = json.loads((tmp_path / 'e.json').read_text())['top1']
    assert f'| test | 32 px | 100 | {top1:.2f} |' in card
    # --extra-img-sizes: a second row measured at that size; the config keeps the trained 32 px
    _aft_vit('eval', '--checkpoint', checkpoint, '--use-ema', '--data-dir', cifar_tiny, '--split', 'test',
             '--img-size', 48, '--json', tmp_path / 'e48.json', '--no-progress', '-j', 0)
    top1_48 = json.loads((tmp_path / 'e48.json').read_text())['top1']
    assert f'| test | 48 px | 100 | {top1_48:.2f} |' in card
    # what the model knows: every class, in output order
    assert '| index | class |' in card and all(f'| {i} | {name} |' in card for i, name in enumerate(classes))


def test_card_names_imagenet_classes_by_their_wordnet_names():
    from aft_vit.hub import _classes_section
    table = _classes_section(['n01440764', 'n03888257'])
    assert table.splitlines()[2:] == ['| 0 | `n01440764` | tench, Tinca tinca |', '| 1 | `n03888257` | parachute, chute |']
    assert _classes_section(None) == 'Class names: not recorded in the checkpoint.'


def test_card_of_a_resumed_run_lists_every_command(checkpoint, cifar_tiny, tmp_path):
    """Weights from a run resumed with --epochs 2 come from two commands: the card shows both, in order."""
    run = tmp_path / 'r'
    shutil.copytree(checkpoint.parent, run)
    _aft_vit('train', '--data-dir', cifar_tiny, *small_model(1), '-b', 32, '--epochs', 2, '--lr', 1e-3,
             '--no-aug', '--model-ema', '--model-ema-decay', 0.5, '--output', tmp_path, '--experiment', 'r',
             '--no-progress', '-j', 0, '--resume', run / 'last.pth.tar')
    _aft_vit('publish', '--checkpoint', run / 'last.pth.tar', '--tag', 'resumed', '--data-dir', cifar_tiny, *PUBLISH,
             '--output', tmp_path / 'weights')
    card = (tmp_path / 'weights' / 'aft_conv_tiny_patch4_32.resumed' / 'README.md').read_text()
    commands = [line for line in card.splitlines() if line.startswith('aft-vit train ')]
    assert len(commands) == 2 and 'Trained in 2 runs' in card
    assert '--resume' not in commands[0] and '--epochs 1' in commands[0]
    assert '--resume' in commands[1] and '--epochs 2' in commands[1]
    # each command after the machine it ran on; the wall time adds up both runs' epochs (training + evaluation)
    lines = card.splitlines()
    assert [lines[lines.index(c) - 1].startswith('# on ') for c in commands] == [True, True]
    assert [lines[lines.index(c) - 1].endswith(', in float32') for c in commands] == [True, True]  # no --amp
    wall = torch.load(run / 'last.pth.tar', weights_only=True)['wall_seconds']
    with open(run / 'summary.csv', newline='') as f:
        epochs = list(csv.DictReader(f))
    measured = sum(float(r['train_seconds']) + float(r['eval_seconds']) for r in epochs)
    assert len(epochs) == 2 and measured <= wall <= measured * 1.1 + 1.0
    assert 'Wall time: 0 min ' in card


def test_publish_refuses_to_overwrite_and_leaves_nothing_half_written(published, checkpoint, cifar_tiny):
    before = sha256_of(published / 'model.safetensors')
    result = _aft_vit('publish', '--checkpoint', checkpoint, '--tag', 'olahtest', '--data-dir', cifar_tiny, *PUBLISH,
                      '--output', published.parent, check=False)
    assert result.returncode == 2 and 'already exists; pass --force' in result.stderr
    result = _aft_vit('publish', '--checkpoint', checkpoint, '--tag', 'other', '--data-dir', cifar_tiny, *PUBLISH[:-3],
                      '--split', 'nosuchsplit', '--output', published.parent, check=False)
    assert result.returncode == 2
    assert sorted(p.name for p in published.parent.iterdir()) == [SUMS_FILE, 'aft_conv_tiny_patch4_32.olahtest']
    _aft_vit('publish', '--checkpoint', checkpoint, '--tag', 'olahtest', '--data-dir', cifar_tiny, *PUBLISH,
             '--output', published.parent, '--force')
    assert sha256_of(published / 'model.safetensors') == before  # same weights, same file
    assert len((published.parent / SUMS_FILE).read_text().splitlines()) == 1


def test_push_uploads_the_folder(published, monkeypatch):
    import huggingface_hub
    calls = []

    class FakeApi:
        def __init__(self, **kwargs):
            calls.append(('init', kwargs))

        def create_repo(self, repo_id, exist_ok=False):
            calls.append(('create_repo', repo_id, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls.append(('upload_folder', repo_id, sorted(os.listdir(folder_path))))
            return 'commit'
    monkeypatch.setattr(huggingface_hub, 'HfApi', FakeApi)
    from aft_vit.hub import push
    push(published, 'some-org/aft_conv_tiny_patch4_32.olahtest')
    assert ('create_repo', 'some-org/aft_conv_tiny_patch4_32.olahtest', True) in calls
    assert ('upload_folder', 'some-org/aft_conv_tiny_patch4_32.olahtest', ['README.md', 'config.json', 'model.safetensors']) in calls


def test_local_dir_and_file_overlay_load_the_published_weights(published, checkpoint):
    expected = _reference(checkpoint, ema=True)(X32)
    local = timm.create_model(f'local-dir:{published}', pretrained=True).eval()
    torch.testing.assert_close(local(X32), expected)
    assert local.pretrained_cfg['label_names'][3] == 'cat'
    overlay = timm.create_model('aft_conv_tiny', pretrained=True, num_classes=10, img_size=32, patch_size=4, depth=1,
                                pretrained_cfg_overlay=dict(file=str(published / 'model.safetensors'), num_classes=10)).eval()
    torch.testing.assert_close(overlay(X32), expected)


def test_loading_adapts_head_channels_and_size(published, checkpoint):
    source = _reference(checkpoint, ema=True)
    five = timm.create_model(f'local-dir:{published}', pretrained=True, num_classes=5).eval()
    assert five(X32).shape == (2, 5)
    torch.testing.assert_close(five.forward_features(X32), source.forward_features(X32))
    gray = timm.create_model(f'local-dir:{published}', pretrained=True, in_chans=1).eval()
    torch.testing.assert_close(gray.patch_embed.proj.weight, source.patch_embed.proj.weight.sum(dim=1, keepdim=True))
    bigger = timm.create_model(f'local-dir:{published}', pretrained=True, img_size=64).eval()
    x64 = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(bigger(x64), source(x64))  # AFT-conv: nothing to resample


def test_loading_resamples_position_parameters(cifar_tiny, tmp_path):
    """An AFT-local model (pos_embed and bias factors) published at 32 px, loaded at 48 px."""
    model = timm.create_model('aft_local_tiny', num_classes=10, img_size=32, patch_size=4, depth=1).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ckpt = tmp_path / 'local.pth.tar'
    torch.save(dict(arch='aft_local_tiny', epoch=0, version=2, state_dict=model.state_dict(),
                    label_names=sorted(p.name for p in (cifar_tiny / 'train').iterdir()),
                    args=dict(model='aft_local_tiny', num_classes=10, img_size=32, crop_pct=1.0,
                              model_kwargs=dict(patch_size=4, depth=1))), ckpt)
    _aft_vit('publish', '--checkpoint', ckpt, '--tag', 'sized', '--data-dir', cifar_tiny, *PUBLISH,
             '--output', tmp_path / 'weights')
    loaded = timm.create_model(f'local-dir:{tmp_path / "weights" / "aft_local_tiny.sized"}', pretrained=True,
                               img_size=48).eval()
    model.set_input_size(img_size=(48, 48))
    x48 = torch.randn(1, 3, 48, 48)
    torch.testing.assert_close(loaded(x48), model(x48), rtol=1e-5, atol=1e-5)


def test_bad_weights_get_clear_errors(published, tmp_path):
    broken = tmp_path / 'truncated'
    shutil.copytree(published, broken)
    data = (broken / 'model.safetensors').read_bytes()
    (broken / 'model.safetensors').write_bytes(data[:len(data) // 2])
    with pytest.raises(PretrainedWeightsError, match=rf'cannot load {broken}.*truncated or corrupt'):
        timm.create_model(f'local-dir:{broken}', pretrained=True)

    other = tmp_path / 'other_arch'
    shutil.copytree(published, other)
    config = json.loads((other / 'config.json').read_text())
    config['architecture'] = 'aft_full_tiny'
    (other / 'config.json').write_text(json.dumps(config))
    with pytest.raises(PretrainedWeightsError, match=rf'cannot load {other} for aft_full_tiny: not aft_full_tiny weights: .*missing'):
        timm.create_model(f'local-dir:{other}', pretrained=True)

    missing = tmp_path / 'missing'
    shutil.copytree(published, missing)
    (missing / 'model.safetensors').unlink()
    with pytest.raises(PretrainedWeightsError, match=rf'cannot load {missing}'):
        timm.create_model(f'local-dir:{missing}', pretrained=True)

    with pytest.raises(PretrainedWeightsError, match=r'for aft_conv_small: not aft_conv_small weights: .*of another shape'):
        timm.create_model('aft_conv_small', pretrained=True, num_classes=10, img_size=32, patch_size=4, depth=1,
                          pretrained_cfg_overlay=dict(file=str(published / 'model.safetensors')))


LOAD_SCRIPT = '''
import json, sys, torch, timm
import aft_vit
sys.path.insert(0, {root!r})
import tests.hub_test_models  # the registry tag with an hf_hub_id
model = timm.create_model(sys.argv[1], pretrained=True).eval()
size = int(sys.argv[2]) if len(sys.argv) > 2 else 32
x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
print(json.dumps(model(x).tolist()))
'''


def _load_via_hub(name: str, endpoint: str, hf_home: Path, offline: bool = False, size: int = 32):
    env = dict(os.environ, HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), PYTHONPATH=str(ROOT),
               HF_HUB_DISABLE_TELEMETRY='1')
    env.pop('HF_TOKEN', None)
    if offline:
        env['HF_HUB_OFFLINE'] = '1'
    result = subprocess.run([sys.executable, '-c', LOAD_SCRIPT.format(root=str(ROOT)), name, str(size)], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope='module')
def hub(published, tmp_path_factory):
    server = HubServer(tmp_path_factory.mktemp('olah')).start()
    server.add_repo('aft-vit-test/aft_conv_tiny_patch4_32.olahtest', published)
    server.add_repo('aft-vit-test/aft_conv_tiny_hubtest.olah', published)
    for folder in sorted((ROOT / 'weights').glob('*.*/')):
        server.add_repo(f'aft-vit/{folder.name}', folder)
    yield server
    server.stop()


def test_hf_hub_download_cache_and_offline_reuse(hub, checkpoint, tmp_path):
    expected = _reference(checkpoint, ema=True)(X32)
    home = tmp_path / 'hf_home'
    home.mkdir()
    online = _load_via_hub('hf-hub:aft-vit-test/aft_conv_tiny_patch4_32.olahtest', hub.url, home)
    torch.testing.assert_close(online, expected)
    assert list(home.rglob('model.safetensors')), 'nothing was downloaded into the empty HF_HOME'
    offline = _load_via_hub('hf-hub:aft-vit-test/aft_conv_tiny_patch4_32.olahtest', 'http://127.0.0.1:9', home, offline=True)
    torch.testing.assert_close(offline, expected)


def test_registry_tag_loads_through_its_hf_hub_id(hub, checkpoint, tmp_path):
    expected = _reference(checkpoint, ema=True)(X32)
    home = tmp_path / 'hf_home'
    home.mkdir()
    torch.testing.assert_close(_load_via_hub('aft_conv_tiny_hubtest.olah', hub.url, home), expected)


def test_every_published_folder_has_a_registry_tag_and_checksum():
    """weights/<model>.<tag>/ folders and the registry's tags with weights describe the same set."""
    folders = sorted(p.name for p in (ROOT / 'weights').glob('*.*') if p.is_dir()) if (ROOT / 'weights').is_dir() else []
    tagged = sorted(timm.list_pretrained('aft_*'))
    assert folders == tagged
    if folders:
        lines = dict(reversed(ln.split('  ')) for ln in (ROOT / 'weights' / SUMS_FILE).read_text().splitlines())
        for name in folders:
            assert lines[f'{name}/model.safetensors'] == sha256_of(ROOT / 'weights' / name / 'model.safetensors')


def test_convert_deit_checkpoint_then_train(cifar_tiny, tmp_path):
    deit = timm.create_model('deit_tiny_patch16_224', num_classes=10)
    with torch.no_grad():
        for p in deit.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    source = tmp_path / 'deit_tiny.pth'
    torch.save(deit.state_dict(), source)
    result = _aft_vit('convert', '--source', source, '--model', 'aft_conv_tiny', '--num-classes', 10,
                      '--output', tmp_path / 'aft.pth')
    assert 'left at init' in result.stdout and 'blocks.0.mixer.qkv.weight[q, k rows]' in result.stdout
    aft = torch.load(tmp_path / 'aft.pth', weights_only=True)['state_dict']
    d = deit.state_dict()
    for i in range(12):
        for name in ('norm1.weight', 'norm1.bias', 'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias',
                     'mlp.fc2.weight', 'mlp.fc2.bias'):
            assert torch.equal(aft[f'blocks.{i}.{name}'], d[f'blocks.{i}.{name}'])
        assert torch.equal(aft[f'blocks.{i}.mixer.proj.weight'], d[f'blocks.{i}.attn.proj.weight'])
        assert torch.equal(aft[f'blocks.{i}.mixer.qkv.weight'][-192:], d[f'blocks.{i}.attn.qkv.weight'][384:])
        assert torch.equal(aft[f'blocks.{i}.mixer.qkv.bias'][-192:], d[f'blocks.{i}.attn.qkv.bias'][384:])
    for name in ('norm.weight', 'norm.bias', 'patch_embed.proj.weight', 'head.weight'):
        assert torch.equal(aft[name], d[name])
    _aft_vit('train', '--data-dir', cifar_tiny, '--model', 'aft_conv_tiny', '--img-size', 64, '--initial-checkpoint',
             tmp_path / 'aft.pth', '-b', 32, '--epochs', 1, '--lr', 1e-4, '--no-aug', '--output', tmp_path,
             '--experiment', 'ft', '--no-progress', '-j', 0)
    row = (tmp_path / 'ft' / 'summary.csv').read_text().splitlines()[1].split(',')
    assert float(row[1]) > 0

    wrong = _aft_vit('convert', '--source', source, '--model', 'aft_conv_small', '--output', tmp_path / 'x.pth',
                     check=False)
    assert wrong.returncode == 2 and 'is 192 wide and 12 deep' in wrong.stderr and 'aft_conv_small' in wrong.stderr


PUBLISHED = sorted(p for p in (ROOT / 'weights').glob('*.*') if p.is_dir())


def _same(a, b) -> bool:
    """Equal after JSON's tuples-become-lists."""
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


@pytest.mark.parametrize('folder', PUBLISHED, ids=lambda p: p.name)
def test_registry_tag_describes_its_published_folder(folder):
    """The tag's pretrained cfg says what the folder's config.json says, and builds the architecture its weights
    need: loading the file into the tag's model gives the folder's own model, output for output."""
    cfg = timm.create_model(folder.name).pretrained_cfg
    assert cfg['hf_hub_id'] == f'aft-vit/{folder.name}'
    reference = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()  # timm reads config.json
    for key in ('num_classes', 'input_size', 'mean', 'std', 'crop_pct', 'interpolation', 'label_names',
                'label_descriptions', 'description'):
        assert _same(cfg.get(key), reference.pretrained_cfg.get(key)), key
    assert reference.pretrained_cfg.get('label_names'), 'the published config has no label names'
    loaded = timm.create_model(folder.name, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(folder / 'model.safetensors'))).eval()
    x = torch.randn(2, *cfg['input_size'], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize('folder', PUBLISHED, ids=lambda p: p.name)
def test_registry_tag_downloads_its_weights_from_the_hub(hub, folder, tmp_path):
    """timm.create_model('<model>.<tag>', pretrained=True) fetches aft-vit/<model>.<tag> (olah serves weights/)."""
    size = json.loads((folder / 'config.json').read_text())['pretrained_cfg']['input_size'][-1]
    reference = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    (tmp_path / 'hf_home').mkdir()
    torch.testing.assert_close(_load_via_hub(folder.name, hub.url, tmp_path / 'hf_home', size=size), reference(x))


def test_readme_quick_start_names_the_photo(hub, tmp_path):
    """README's quick start, run as written against the Hub mirror, prints what README says, and calls the cat a cat."""
    readme = (ROOT / 'README.md').read_text(encoding='utf-8')
    code = next(b for b in re.findall(r'```python\n(.*?)```', readme, flags=re.S) if 'chelsea' in b)
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path), HF_HUB_DISABLE_TELEMETRY='1')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    claimed = re.search(r'# prints: (.*)', code).group(1).strip()
    assert result.stdout.strip().splitlines()[-1] == claimed, result.stdout
    assert claimed.split()[0] == 'cat', f'the published CIFAR-10 weights misclassify chelsea: {claimed}'


def test_small_data_tags_are_opt_in():
    """The default tag stays the untrained ImageNet-1k config: aft_conv_tiny is not silently a CIFAR-10 model."""
    default = timm.create_model('aft_conv_tiny')
    assert default.pretrained_cfg['tag'] == 'untrained' and default.num_classes == 1000
    assert default.patch_embed.proj.weight.shape[-1] == 16


def test_tags_never_change_the_architecture():
    """As in timm, a pretrained tag selects weights only; a small-image geometry is a model name of its own."""
    for name in timm.list_pretrained('aft_*'):
        architecture, tag = name.split('.')
        untagged = timm.create_model(architecture, device='meta', num_classes=10)
        tagged = timm.create_model(name, device='meta', num_classes=10)
        assert {k: v.shape for k, v in tagged.state_dict().items()} == \
            {k: v.shape for k, v in untagged.state_dict().items()}, name
    cifar = timm.create_model('aft_conv_tiny_patch4_32.cifar10')
    assert cifar.patch_embed.proj.weight.shape[-1] == 4 and cifar.num_classes == 10
    with pytest.raises(RuntimeError, match='Invalid pretrained tag'):
        timm.create_model('aft_conv_tiny.cifar10')


HUB_ERROR_SCRIPT = '''
import sys
import aft_vit, timm
from aft_vit.errors import PretrainedWeightsError
try:
    timm.create_model('aft_conv_tiny_patch4_32', pretrained=True, depth=1,
                      pretrained_cfg_overlay=dict(hf_hub_id=sys.argv[1]))
except PretrainedWeightsError as e:
    print(e)
'''


def _hub_error(repo_id: str, endpoint: str, hf_home: Path, offline: bool = False) -> str:
    """The PretrainedWeightsError message of loading ``repo_id`` from ``endpoint`` in a fresh process."""
    env = dict(os.environ, HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY='1')
    env.pop('HF_TOKEN', None)
    if offline:
        env['HF_HUB_OFFLINE'] = '1'
    result = subprocess.run([sys.executable, '-c', HUB_ERROR_SCRIPT, repo_id], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip(), result.stderr[-3000:]
    return result.stdout.strip()


def test_hub_failures_are_told_apart(hub, published, tmp_path):
    """No connection (offline, nothing cached), no such repository, and a bad file: three messages, three fixes."""
    offline = _hub_error('aft-vit-test/aft_conv_tiny_patch4_32.olahtest', hub.url, tmp_path / 'empty', offline=True)
    assert 'HF_HUB_OFFLINE is set and no copy of aft-vit-test/aft_conv_tiny_patch4_32.olahtest is cached' in offline
    assert 'local-dir:PATH' in offline and 'corrupt' not in offline

    missing = _hub_error('aft-vit-test/no-such-model', hub.url, tmp_path / 'home1')
    assert 'the Hub has no repository aft-vit-test/no-such-model' in missing and 'hf-hub:ORG/NAME' in missing
    assert 'corrupt' not in missing

    broken = tmp_path / 'truncated'
    shutil.copytree(published, broken)
    data = (broken / 'model.safetensors').read_bytes()
    (broken / 'model.safetensors').write_bytes(data[:len(data) // 2])
    hub.add_repo('aft-vit-test/truncated', broken)
    bad = _hub_error('aft-vit-test/truncated', hub.url, tmp_path / 'home2')
    assert 'cannot load hf-hub:aft-vit-test/truncated' in bad and 'truncated or corrupt' in bad


def test_unreachable_hub_says_so():
    """A refused connection under huggingface_hub's "not in the local cache" error: no connection, not a bad file."""
    from huggingface_hub.errors import LocalEntryNotFoundError
    from aft_vit.checkpoint import explain_pretrained_errors
    with pytest.raises(PretrainedWeightsError, match=r'hf-hub:org/name .*the Hub could not be reached and no copy '
                                                     r'of org/name is cached: connect .*HF_HUB_OFFLINE=1'):
        with explain_pretrained_errors('aft_conv_tiny', True, dict(pretrained_cfg=dict(hf_hub_id='org/name'))):
            try:
                raise ConnectionRefusedError(111, 'Connection refused')
            except ConnectionRefusedError as refused:
                raise LocalEntryNotFoundError('cannot find the requested files in the local cache') from refused



def _cat_photo(tmp_path: Path) -> Path:
    from PIL import Image
    from skimage.data import chelsea
    path = tmp_path / 'chelsea.png'
    Image.fromarray(chelsea()).save(path)
    return path


def test_cli_predicts_and_evaluates_from_published_weights(hub, cifar_tiny, tmp_path):
    """timm's --model NAME --pretrained, for a registry tag (downloaded from the Hub) and a local-dir: folder;
    labels come from the published config."""
    folder = ROOT / 'weights' / 'aft_conv_tiny_stem4_32.cifar10'
    photo = _cat_photo(tmp_path)
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / 'hf_home'), HF_HUB_DISABLE_TELEMETRY='1')
    env.pop('HF_TOKEN', None)
    result = subprocess.run([sys.executable, '-m', 'aft_vit', 'predict', '--model', 'aft_conv_tiny_stem4_32.cifar10',
                             '--pretrained', str(photo), '--topk', '3', '--json'], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    from_hub = json.loads(result.stdout)[0]['predictions']
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    from PIL import Image
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    with torch.no_grad():
        probs, indices = model(transform(Image.open(photo).convert('RGB')).unsqueeze(0)).softmax(-1)[0].topk(3)
    names = model.pretrained_cfg['label_names']
    assert [p['label'] for p in from_hub] == [names[i] for i in indices] and from_hub[0]['label'] == 'cat'
    assert [p['probability'] for p in from_hub] == pytest.approx(probs.tolist(), abs=1e-5)

    local = _aft_vit('predict', '--model', f'local-dir:{folder}', '--pretrained', photo, '--topk', '3')
    assert local.stdout.startswith(f'{photo}: cat ')
    evaluated = _aft_vit('eval', '--model', f'local-dir:{folder}', '--pretrained', '--data-dir', cifar_tiny,
                         '--split', 'test', '--no-progress', '-j', 0)
    assert re.search(r'on .*test \(100 images\): top1 [\d.]+', evaluated.stdout), evaluated.stdout
