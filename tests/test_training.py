"""aft-vit train / eval / predict and python -m aft_vit.run, end to end on real CIFAR-10 images (../shared/data)."""
import csv
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml

from aft_vit.cli import main as cli_main
from aft_vit.errors import UserInputError
from aft_vit.evaluate import evaluate
from aft_vit.holdout import make_holdout
from aft_vit.train import build_parser as train_parser, parse_args
from aft_vit.labels import imagenet_descriptions
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parent.parent


def small_model(depth: int):
    """aft_conv_tiny_patch4_32 with ``depth`` blocks (32 px, 4 px patches: 64 tokens), CIFAR normalization."""
    return ['--model', 'aft_conv_tiny_patch4_32', '--model-kwargs', f'depth={depth}',
            '--crop-pct', '1.0', '--mean', '0.4914', '0.4822', '0.4465', '--std', '0.247', '0.2435', '0.2616']


SMALL_MODEL = small_model(4)


def _aft_vit(*args, check=True, timeout=600, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env_extra or {}))
    result = subprocess.run([sys.executable, '-m', 'aft_vit', *map(str, args)], capture_output=True, text=True,
                            env=env, timeout=timeout, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f'aft-vit {args[0]} failed ({result.returncode}):\n{result.stderr[-3000:]}')
    return result


def _summary(folder: Path):
    with open(folder / 'summary.csv') as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def trained(cifar_small, tmp_path_factory):
    """Train the small AFT-conv for 4 epochs on 2,000 CIFAR-10 images, evaluate on 500 held-out ones."""
    out = tmp_path_factory.mktemp('train')
    _aft_vit('train', '--data-dir', cifar_small, *SMALL_MODEL, '-b', 64, '--epochs', 4, '--warmup-epochs', 1,
             '--lr', 2e-3, '--smoothing', 0, '--hflip', 0.5, '--scale', 0.6, 1.0, '--output', out,
             '--experiment', 'run', '--no-progress', '-j', 2)
    return out / 'run'


def test_training_lowers_loss_and_beats_chance(trained):
    rows = _summary(trained)
    assert [int(r['epoch']) for r in rows] == [0, 1, 2, 3]
    assert 'train_img_size' not in rows[0]  # a column only with --size-schedule: older runs resume into their csv
    losses = [float(r['train_loss']) for r in rows]
    assert losses[-1] < losses[0] - 0.2, f'train loss did not go down: {losses}'
    top1 = max(float(r['eval_top1']) for r in rows)
    assert top1 > 25., f'held-out top-1 {top1}% is not clearly above chance (10%)'
    for name in ('last.pth.tar', 'model_best.pth.tar', 'args.yaml'):
        assert (trained / name).is_file()


def test_eval_on_checkpoint_reports_the_training_accuracy(trained, cifar_small, tmp_path):
    best = torch.load(trained / 'model_best.pth.tar', weights_only=True)
    best_row = next(r for r in _summary(trained) if int(r['epoch']) == best['epoch'])
    result = _aft_vit('eval', '--checkpoint', trained / 'model_best.pth.tar', '--data-dir', cifar_small,
                      '--json', tmp_path / 'eval.json', '--no-progress', '-j', 2)
    metrics = json.loads((tmp_path / 'eval.json').read_text())
    assert metrics['images'] == 500
    assert metrics['top1'] == pytest.approx(float(best_row['eval_top1']), abs=1e-9)
    assert metrics['top5'] == pytest.approx(float(best_row['eval_top5']), abs=1e-9)
    assert metrics['loss'] == pytest.approx(float(best_row['eval_loss']), rel=1e-5)
    assert 'top1' in result.stdout and metrics['img_per_sec'] > 0


def test_mirror_tta_scores_the_mean_of_both_images_logits():
    """evaluate(hflip_tta=True) against top-1, top-5 and cross-entropy computed here from the two logits' mean."""
    torch.manual_seed(0)
    model = timm.create_model('aft_conv_tiny_patch4_32', depth=1, num_classes=10).eval()
    batches = [(torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))) for _ in range(3)]
    with torch.no_grad():
        logits = torch.cat([(model(x) + model(x.flip(-1))) / 2 for x, _ in batches])
        plain = torch.cat([model(x) for x, _ in batches])
    targets = torch.cat([y for _, y in batches])
    assert not torch.allclose(logits, plain), 'the mirror should change a random model\'s logits'
    metrics = evaluate(model, batches, hflip_tta=True)
    top5 = (logits.topk(5, dim=1).indices == targets[:, None]).any(dim=1).float().mean() * 100
    assert metrics['top1'] == pytest.approx(float((logits.argmax(1) == targets).float().mean() * 100))
    assert metrics['top5'] == pytest.approx(float(top5))
    assert metrics['loss'] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, targets)), rel=1e-5)


def test_predict_names_the_classes(trained, cifar_small):
    images = sorted((cifar_small / 'test' / 'cat').iterdir())[:2]
    result = _aft_vit('predict', '--checkpoint', trained / 'model_best.pth.tar', *images, '--topk', 3, '--json')
    out = json.loads(result.stdout)
    classes = sorted(p.name for p in (cifar_small / 'train').iterdir())
    assert [r['image'] for r in out] == [str(p) for p in images]
    for r in out:
        assert len(r['predictions']) == 3 and all(p['label'] in classes for p in r['predictions'])
        assert all(p['description'] == p['label'] for p in r['predictions'])  # CIFAR's folders are words already
        probs = [p['probability'] for p in r['predictions']]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


# Imagenette's class folders and their words, as ../shared/data/README.md lists them.
IMAGENETTE = {'n01440764': 'tench', 'n02102040': 'English springer', 'n02979186': 'cassette player',
              'n03000684': 'chain saw', 'n03028079': 'church', 'n03394916': 'French horn',
              'n03417042': 'garbage truck', 'n03425413': 'gas pump', 'n03445777': 'golf ball',
              'n03888257': 'parachute'}


def test_wordnet_id_labels_get_readable_descriptions():
    found = imagenet_descriptions(sorted(IMAGENETTE))
    assert {wnid: text.split(',')[0] for wnid, text in found.items()} == IMAGENETTE
    assert imagenet_descriptions(['cat', 'dog']) is None and imagenet_descriptions(['n01440764', 'cat']) is None


RESUME_ARGS = [*small_model(2), '-b', 32, '--epochs', 2, '--warmup-epochs', 1,
               '--lr', 1e-3, '--aa', 'rand-m9-mstd0.5-inc1', '--reprob', 0.25, '--mixup', 0.8, '--cutmix', 1.0,
               '--drop-path', 0.1, '--model-ema', '--model-ema-decay', 0.9, '--no-progress', '-j', 2]


def test_resume_after_a_kill_gives_identical_weights(cifar_tiny, tmp_path):
    """2 epochs straight == 1 epoch, killed (SIGKILL) right after its checkpoint, then --resume for the rest."""
    _aft_vit('train', '--data-dir', cifar_tiny, *RESUME_ARGS, '--output', tmp_path, '--experiment', 'straight')

    run = _train_killed_after_its_first_epoch(['--data-dir', cifar_tiny, *RESUME_ARGS], tmp_path / 'killed')
    _aft_vit('train', '--data-dir', cifar_tiny, *RESUME_ARGS, '--output', tmp_path, '--experiment', 'killed',
             '--resume', run / 'last.pth.tar')
    _assert_same_run(tmp_path / 'straight', run, ('state_dict', 'state_dict_ema'))


def _train_killed_after_its_first_epoch(train_args, run: Path) -> Path:
    """Start ``aft-vit train`` into ``run`` and kill it (SIGKILL) as soon as epoch 0's checkpoint is written."""
    cmd = [sys.executable, '-m', 'aft_vit', 'train', *train_args, '--output', run.parent, '--experiment', run.name]
    proc = subprocess.Popen(list(map(str, cmd)), env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / 'last.pth.tar').exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    first = torch.load(run / 'last.pth.tar', weights_only=True)  # whole, despite the kill
    assert first['epoch'] == 0, 'the kill came too late to test resuming'
    return run


def _assert_same_run(straight_run: Path, resumed_run: Path, state_keys) -> None:
    """Two runs of 2 epochs, one resumed after epoch 0, ended with identical weights, optimizer and summary."""
    straight = torch.load(straight_run / 'last.pth.tar', weights_only=True)
    resumed = torch.load(resumed_run / 'last.pth.tar', weights_only=True)
    assert resumed['epoch'] == straight['epoch'] == 1
    for key in state_keys:
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][name]), f'{key}.{name} differs after resume'
    assert straight['optimizer']['state'].keys() == resumed['optimizer']['state'].keys()
    assert [r['epoch'] for r in _summary(resumed_run)] == ['0', '1']
    assert _summary(resumed_run)[1]['train_loss'] == _summary(straight_run)[1]['train_loss']


def test_size_schedule_trains_each_epoch_at_its_size_also_after_a_resume(cifar_tiny, tmp_path):
    """Progressive resizing: epoch 0 at 16 px, epoch 1 at 32 px, and a run killed after epoch 0 resumes at 32 px."""
    args = ['--data-dir', cifar_tiny, *small_model(2), '-b', 32, '--epochs', 2, '--warmup-epochs', 0, '--lr', 1e-3,
            '--size-schedule', '0:16', '1:32', '--no-progress', '-j', 2]
    _aft_vit('train', *args, '--output', tmp_path, '--experiment', 'straight')
    assert [r['train_img_size'] for r in _summary(tmp_path / 'straight')] == ['16', '32']  # the batches' size
    run = _train_killed_after_its_first_epoch(args, tmp_path / 'killed')
    _aft_vit('train', *args, '--output', tmp_path, '--experiment', 'killed', '--resume', run / 'last.pth.tar')
    _assert_same_run(tmp_path / 'straight', run, ('state_dict',))
    assert [r['train_img_size'] for r in _summary(run)] == ['16', '32']


def test_resume_with_more_epochs_extends_the_schedule(cifar_tiny, tmp_path):
    """A finished 1-epoch run resumed with --epochs 3 follows the 3-epoch schedule, not the checkpoint's old one."""
    at = RESUME_ARGS.index('--epochs') + 1

    def epochs(n):
        return [*RESUME_ARGS[:at], n, *RESUME_ARGS[at + 1:]]

    _aft_vit('train', '--data-dir', cifar_tiny, *epochs(3), '--output', tmp_path, '--experiment', 'straight')
    _aft_vit('train', '--data-dir', cifar_tiny, *epochs(1), '--output', tmp_path, '--experiment', 'short')
    _aft_vit('train', '--data-dir', cifar_tiny, *epochs(3), '--output', tmp_path, '--experiment', 'short',
             '--resume', tmp_path / 'short' / 'last.pth.tar')

    # summary.csv's lr is the one set for the next epoch
    straight, extended = _summary(tmp_path / 'straight'), _summary(tmp_path / 'short')
    assert [r['epoch'] for r in extended] == ['0', '1', '2']
    assert float(extended[0]['lr']) < 0.5 * float(straight[0]['lr'])  # epoch 0 really ended a 1-epoch schedule
    for row in (1, 2):
        assert float(extended[row]['lr']) == pytest.approx(float(straight[row]['lr']), rel=1e-9)
    history = torch.load(tmp_path / 'short' / 'last.pth.tar', weights_only=True)['args']['command_history']
    assert len(history) == 2 and '--resume' not in history[0] and '--resume' in history[1]
    assert ['--epochs', '1'] == history[0].split()[history[0].split().index('--epochs'):][:2]


def test_time_precisions_leaves_the_model_as_it_was():
    """The timing passes run on a copy: weights, batch-norm statistics (the conv stem has some) and gradients stay."""
    import timm
    from aft_vit.precision import autocast_is_faster, time_precisions
    model = timm.create_model('aft_conv_tiny_stem4_32', depth=1, num_classes=10).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    times = time_precisions(model, (3, 32, 32), batch_size=4, num_classes=10, amp_dtype=torch.bfloat16, steps=1)
    assert set(times) == {'float32', 'bfloat16'} and all(t > 0 for t in times.values())
    assert autocast_is_faster(times) == (times['bfloat16'] < times['float32'])
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_amp_auto_picks_the_faster_precision_and_keeps_it_on_resume_on_the_same_machine(
        cifar_tiny, tmp_path, monkeypatch):
    """--amp-auto trains in what the timing found faster and records it; a resume on the machine of the last session
    keeps that precision without timing again (an exact resume), a resume on another machine times again."""
    import aft_vit.train as train_module
    timings = []

    def fake_timing(faster):
        def timing(model, input_size, batch_size, num_classes, amp_dtype):
            timings.append(tuple(input_size))
            return {'float32': 1.0, 'bfloat16': 0.5} if faster == 'bfloat16' else {'float32': 0.5, 'bfloat16': 1.0}
        return timing

    common = ['--data-dir', str(cifar_tiny), *map(str, small_model(1)), '-b', '32', '--warmup-epochs', '0',
              '--lr', '1e-3', '--no-progress', '-j', '0', '--val-split', '', '--amp-auto', '--output', str(tmp_path),
              '--experiment', 'run']
    last = tmp_path / 'run' / 'last.pth.tar'

    def precisions():
        return torch.load(last, weights_only=True)['args']['precision_history']

    monkeypatch.setattr(train_module, 'time_precisions', fake_timing('bfloat16'))
    assert train_module.main([*common, '--epochs', '1']) == 0
    assert timings == [(3, 32, 32)] and precisions() == ['bfloat16 autocast']
    assert yaml.safe_load((tmp_path / 'run' / 'args.yaml').read_text())['amp'] is True

    monkeypatch.setattr(train_module, 'time_precisions', fake_timing('float32'))
    assert train_module.main([*common, '--epochs', '2', '--resume', str(last)]) == 0
    assert len(timings) == 1 and precisions() == ['bfloat16 autocast'] * 2

    monkeypatch.setattr(train_module, 'machine_description', lambda: 'another processor')
    assert train_module.main([*common, '--epochs', '3', '--resume', str(last)]) == 0
    assert len(timings) == 2 and precisions() == ['bfloat16 autocast'] * 2 + ['float32']


def test_torchrun_two_processes_match_one_process(cifar_tiny, tmp_path):
    """One step per epoch over all 320 images: 2 ranks x 160 must equal 1 process x 320 (DDP averages gradients).

    Plain SGD, so the weights move by lr x gradient and float noise stays float noise (Adam divides by the
    gradient's own size and would blow noise in near-zero gradients up to the learning rate).
    """
    torchrun = Path(sys.executable).with_name('torchrun')
    runs = {}
    for nproc in (1, 2):
        cmd = [torchrun, f'--nproc_per_node={nproc}', '--master_addr=127.0.0.1', f'--master_port={29600 + nproc}',
               '-m', 'aft_vit', 'train', '--data-dir', cifar_tiny, *SMALL_MODEL, '-b', 320 // nproc,
               '--epochs', 3, '--warmup-epochs', 0, '--opt', 'sgd', '--lr', 0.05, '--weight-decay', 0,
               '--no-aug', '--smoothing', 0, '--val-split', '',
               '--output', tmp_path, '--experiment', f'n{nproc}', '--no-progress', '-j', 0]
        result = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=600, cwd=ROOT,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[nproc] = (result.stdout, torch.load(tmp_path / f'n{nproc}' / 'last.pth.tar', weights_only=True))
    assert 'parameters across 2 ranks: max |difference| 0' in runs[2][0]
    single, double = runs[1][1]['state_dict'], runs[2][1]['state_dict']
    for name in single:
        torch.testing.assert_close(double[name], single[name], rtol=1e-4, atol=1e-5)
    losses = [[float(r['train_loss']) for r in _summary(tmp_path / f'n{n}')] for n in (1, 2)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[0][-1] < losses[0][0]


def test_run_module_runs_a_timm_script(tmp_path):
    script = tmp_path / 'script.py'
    script.write_text(
        'import sys, timm\n'
        'model = timm.create_model("aft_conv_tiny")\n'
        'print(__name__, sys.argv[1:], sum(p.numel() for p in model.parameters()))\n')
    result = subprocess.run([sys.executable, '-m', 'aft_vit.run', str(script), '--model', 'aft_conv_tiny'],
                            capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['__main__', "['--model',", "'aft_conv_tiny']", '5356072']


def _one_line_error(capsys, argv, expected):
    code = cli_main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and 'Traceback' not in err, err
    assert expected in err, err
    return err


def test_bad_input_gives_one_line_errors(tmp_path, cifar_tiny, capsys):
    _one_line_error(capsys, ['train', '--data-dir', str(tmp_path / 'nowhere')], 'does not exist')
    empty = tmp_path / 'empty'
    empty.mkdir()
    _one_line_error(capsys, ['train', '--data-dir', str(empty)], "no 'train' split")
    (empty / 'train' / 'cat').mkdir(parents=True)
    (empty / 'val' / 'cat').mkdir(parents=True)
    _one_line_error(capsys, ['train', '--data-dir', str(empty)], f'class folder {empty / "train" / "cat"} has no images')
    broken = tmp_path / 'broken'
    for split in ('train', 'val'):
        (broken / split / 'cat').mkdir(parents=True)
        (broken / split / 'cat' / 'fine.png').write_bytes((cifar_tiny / 'train' / 'cat').iterdir().__next__()
                                                          .read_bytes())
    (broken / 'train' / 'cat' / 'bad.jpg').write_bytes(b'not an image at all')
    _one_line_error(capsys, ['train', '--data-dir', str(broken)], f'unreadable image file {broken}/train/cat/bad.jpg')
    (broken / 'train' / 'cat' / 'bad.jpg').unlink()
    from PIL import Image
    Image.new('RGB', (8, 8)).save(broken / 'train' / 'cat' / 'photo.webp')  # PIL reads it, timm's reader skips it
    _one_line_error(capsys, ['train', '--data-dir', str(broken)],
                    f'1 image(s) in {broken}/train/cat (e.g. {broken}/train/cat/photo.webp) have an extension')
    _one_line_error(capsys, ['train', '--data-dir', str(cifar_tiny), '--model', 'aft_conv_gigantic'],
                    "unknown model 'aft_conv_gigantic'")
    _one_line_error(capsys, ['train', '--data-dir', str(cifar_tiny), *SMALL_MODEL, '--size-schedule', '5:16', '9:32'],
                    'the first step must be at epoch 0')
    _one_line_error(capsys, ['train', '--data-dir', str(cifar_tiny), *SMALL_MODEL, '--size-schedule', '0-16'],
                    "step '0-16' is not EPOCH:SIZE")
    _one_line_error(capsys, ['train', '--data-dir', str(cifar_tiny), '--model', 'vit_tiny_patch16_224', '--img-size',
                             '32', '--model-kwargs', 'patch_size=4', '--size-schedule', '0:16', '1:32'],
                    'the model cannot take 16x16 images')
    other = tmp_path / 'other.pth.tar'
    torch.save(dict(arch='aft_full_tiny', epoch=0, version=2, state_dict={}), other)
    _one_line_error(capsys, ['train', '--data-dir', str(cifar_tiny), *SMALL_MODEL, '--resume', str(other)],
                    'is for aft_full_tiny, not aft_conv_tiny')
    _one_line_error(capsys, ['eval', '--data-dir', str(cifar_tiny), '--checkpoint', str(tmp_path / 'missing.pth')],
                    'does not exist')
    _one_line_error(capsys, ['predict', '--model', 'aft_conv_tiny', 'x.jpg'], 'No pretrained weights')


def test_cli_process_exit_code_without_traceback(tmp_path):
    result = _aft_vit('train', '--data-dir', tmp_path / 'nowhere', check=False)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert result.stderr.strip().startswith('aft-vit train: error:')


# the recipes, and the studies' starting recipes
RECIPES = sorted((ROOT / 'recipes').rglob('*.yaml')) + sorted((ROOT / 'results').rglob('base-*.yaml'))
DEIT = dict(epochs=300, opt='adamw', lr_base=5e-4, lr_base_size=512, weight_decay=0.05, sched='cosine',
            warmup_epochs=5, smoothing=0.1, drop_path=0.1, aa='rand-m9-mstd0.5-inc1', mixup=0.8, cutmix=1.0,
            reprob=0.25, aug_repeats=3)


@pytest.mark.parametrize('recipe', RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_recipes_use_train_argument_names(recipe):
    cfg = yaml.safe_load(recipe.read_text())
    known = {a.dest for a in train_parser()._actions}
    assert set(cfg) <= known, f'{recipe.name}: not timm train.py argument names: {set(cfg) - known}'
    args = parse_args(['--config', str(recipe), '--data-dir', 'somewhere'])
    for key, value in cfg.items():
        assert getattr(args, key) == value


def test_imagenet_recipes_cover_every_model_with_deits_recipe():
    import timm
    imagenet = ROOT / 'recipes' / 'imagenet'
    for name in timm.list_models('aft_*'):
        if timm.get_pretrained_cfg(name).num_classes != 1000:  # a small-image architecture: its data's recipes
            assert list((ROOT / 'recipes').glob(f'*/{name}.*yaml')), f'no recipe for {name}'
            continue
        cfg = yaml.safe_load((imagenet / f'{name}.yaml').read_text())
        assert cfg['model'] == name and cfg['img_size'] == 224
        assert {k: cfg[k] for k in DEIT} == DEIT
    finetune = yaml.safe_load((imagenet / 'aft_conv_base_k25_finetune_from_deit_base_384.yaml').read_text())
    assert (finetune['model'], finetune['img_size'], finetune['batch_size'], finetune['epochs']) == \
        ('aft_conv_base_k25', 384, 64, 100)


def test_readme_main_job_trains(cifar_tiny, tmp_path):
    """The README's main job, as written but cut to one epoch of a 1-block model on 320 images: it runs end to end."""
    readme = (ROOT / 'README.md').read_text(encoding='utf-8')
    job = next(b for b in re.findall(r'```bash\n(.*?)```', readme, flags=re.S) if 'aft-vit train' in b)
    argv = shlex.split(job.split('&&')[-1].strip())
    assert argv[:2] == ['aft-vit', 'train']
    _aft_vit(*argv[1:], '--data-dir', cifar_tiny, '--model-kwargs', 'depth=1', '--epochs', 1, '--output', tmp_path,
             '--experiment', 'r', '--no-progress')
    recipe = yaml.safe_load((ROOT / argv[argv.index('--config') + 1]).read_text())
    row = _summary(tmp_path / 'r')[0]
    assert float(row['train_loss']) > 0 and 'eval_top1' not in row  # --val-split '': no per-epoch test evaluation
    args = yaml.safe_load((tmp_path / 'r' / 'args.yaml').read_text())
    assert (args['model'], args['batch_size'], args['num_classes']) == (recipe['model'], recipe['batch_size'], 10)


def test_randaugment_top_magnitude_posterize_does_not_crash():
    """DeiT's rand-m9-mstd0.5-inc1 reaches magnitude 10, where timm asks Pillow for 0-bit posterize."""
    from PIL import Image
    from timm.data.auto_augment import AugmentOp
    image = Image.new('RGB', (32, 32), (200, 100, 50))
    op = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)
    out = op(image)
    assert out.size == image.size and out.getextrema() == ((0, 0), (0, 0), (0, 0))
    assert AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=5)(image).getpixel((0, 0)) != (0, 0, 0)


def test_holdout_split_is_seeded_disjoint_and_readable_by_timm(cifar_tiny, tmp_path):
    from timm.data import create_dataset
    main = cli_main
    assert main(['holdout', '--data-dir', str(cifar_tiny), '--output', str(tmp_path / 'a'), '--per-class', '3']) == 0
    assert main(['holdout', '--data-dir', str(cifar_tiny), '--output', str(tmp_path / 'b'), '--per-class', '3']) == 0
    assert main(['holdout', '--data-dir', str(cifar_tiny), '--output', str(tmp_path / 'c'), '--per-class', '3',
                 '--seed', '1']) == 0

    def names(root, split):
        return sorted(str(p.relative_to(root / split)) for p in (root / split).rglob('*.jpg'))
    original = sorted(str(p.relative_to(cifar_tiny / 'train')) for p in (cifar_tiny / 'train').rglob('*.jpg'))
    a, b, c = tmp_path / 'a', tmp_path / 'b', tmp_path / 'c'
    assert len(names(a, 'holdout')) == 30 and not set(names(a, 'holdout')) & set(names(a, 'train'))
    assert sorted(names(a, 'holdout') + names(a, 'train')) == original
    assert names(a, 'holdout') == names(b, 'holdout') != names(c, 'holdout')
    link = next((a / 'holdout').rglob('*.jpg'))
    assert link.is_symlink() and link.resolve().parent.parent == (cifar_tiny / 'train').resolve()
    assert len(create_dataset('', root=str(a / 'holdout'), split='holdout')) == 30
    with pytest.raises(UserInputError, match='already exists'):
        make_holdout(str(cifar_tiny), str(a), per_class=3)
    with pytest.raises(UserInputError, match='not more than --per-class 40'):
        make_holdout(str(cifar_tiny), str(tmp_path / 'd'), per_class=40)
    assert not (tmp_path / 'd').exists() and not list(tmp_path.glob('.d.*'))


def test_gpu_lease_pack_and_unpack_bring_back_the_weights_without_the_optimizer(tmp_path, monkeypatch):
    """What a GPU lease sends back (pieces under the device tool's 16 MiB) joins into a checkpoint with the trained
    weights, epoch and arguments of last.pth.tar, and without the optimizer state that only a resume needs."""
    lease = load_script('recipes/cifar10/gpu_lease.py')
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    state_dict = {'weight': torch.randn(1200, 1000, generator=torch.Generator().manual_seed(0))}  # ~4.6 MiB
    torch.save(dict(epoch=26, arch='aft_conv_tiny_stem4_32', args=dict(epochs=27), state_dict=state_dict,
                    optimizer=dict(state={0: dict(exp_avg=torch.ones(3))}), scheduler=dict(last_epoch=27)),
               run_dir / 'last.pth.tar')
    (run_dir / 'summary.csv').write_text('epoch,train_loss,train_seconds\n0,2.0,12.5\n')
    (run_dir / 'args.yaml').write_text('epochs: 27\n')
    monkeypatch.setattr(lease, 'PART_BYTES', 2 ** 20)  # several pieces, as a 20 MiB checkpoint makes at 15 MiB
    assert lease.pack(run_dir, tmp_path / 'out') == 0
    pieces = sorted((tmp_path / 'out').glob('weights.pth.tar.part*'))
    assert len(pieces) == 5 and all(p.stat().st_size <= 2 ** 20 for p in pieces)

    monkeypatch.setattr(lease, 'ROOT', tmp_path / 'here')
    lease.unpack(tmp_path / 'out', 'aft_conv_tiny_stem4_32')
    back_dir = tmp_path / 'here' / 'output' / 'cifar10-gpu' / 'aft_conv_tiny_stem4_32'
    back = torch.load(back_dir / 'last.pth.tar', weights_only=True)
    assert 'optimizer' not in back and 'scheduler' not in back
    assert (back['epoch'], back['args']) == (26, dict(epochs=27))
    torch.testing.assert_close(back['state_dict']['weight'], state_dict['weight'], rtol=0, atol=0)
    assert (back_dir / 'summary.csv').read_text() == (run_dir / 'summary.csv').read_text()


def test_gpu_lease_calibrates_the_fallback_recipe_where_the_recipe_fails(tmp_path, monkeypatch):
    """A lease cannot be repeated: a recipe whose calibration fails (here: exit status 1) hands over to
    ``--fallback-recipe``, whose timed epochs and name come back for the run that follows."""
    lease = load_script('recipes/cifar10/gpu_lease.py')
    calls = []

    def fake_run(command, cwd=None):
        recipe = command[command.index('--config') + 1]
        calls.append(recipe)
        if recipe == 'broken.yaml':
            return subprocess.CompletedProcess(command, 1)
        summary = Path('/tmp/lease-calibration/calibration/summary.csv')
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text('epoch,train_loss,train_seconds\n0,2.0,12.5\n1,1.8,6.25\n')
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(lease.subprocess, 'run', fake_run)
    seconds, _, recipe, backend = lease._calibrate('broken.yaml', 'inductor', 'fallback.yaml')
    assert calls == ['broken.yaml', 'broken.yaml', 'fallback.yaml']  # compiled, eager, then the fallback
    assert (seconds, recipe, backend) == ([12.5, 6.25], 'fallback.yaml', '')
    with pytest.raises(SystemExit, match='calibration failed'):
        lease._calibrate('broken.yaml', '', '')
