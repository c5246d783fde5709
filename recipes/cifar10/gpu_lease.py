"""Train the CIFAR-10 recipe for as long as a short GPU lease allows, in one unattended run (issue 14).

A lease is a few minutes on a bare machine that cannot reach the internet, so everything it needs travels with the
working tree, and nothing it leaves behind survives it:

    python recipes/cifar10/gpu_lease.py prepare        # here: CIFAR-10's training images and the timm wheel
    python recipes/cifar10/gpu_lease.py run --out DIR  # there: train, then pack the weights into DIR
    python recipes/cifar10/gpu_lease.py run --recipe recipes/cifar10/aft_conv_tiny_stem4_32.gpu-resident.yaml \
        --fallback-recipe recipes/cifar10/aft_conv_tiny_stem4_32.gpu-lease.yaml --experiment NAME --out DIR
    python recipes/cifar10/gpu_lease.py unpack DIR     # here: DIR's pieces back into output/cifar10-gpu/<experiment>/

``run`` times two calibration epochs first, then trains ``--epochs`` as many as fit the budget in one schedule (one
warm-up, one cosine decay), so the learning rate schedule is fixed before the run starts. Where the recipe fails to
calibrate (a lease cannot be repeated), ``--fallback-recipe`` is calibrated and trained instead. Only the training split
travels: the test split is for the final evaluation, done here by ``aft-vit eval`` on the last checkpoint.
"""
import argparse
import csv
import io
import math
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import List, Tuple

ROOT = Path(__file__).resolve().parents[2]
LEASE_DIR = ROOT / '.gpu-lease'  # ignored by git; named in the device tool's carry
TRAIN_ZIP = LEASE_DIR / 'cifar10-train.zip'
RECIPE = 'recipes/cifar10/aft_conv_tiny_stem4_32.gpu-lease.yaml'
EXPERIMENT = 'aft_conv_tiny_stem4_32'
OUTPUT = 'output/cifar10-gpu'
PART_BYTES = 15 * 2 ** 20  # the device tool returns files of at most 16 MiB
TRAINING_STATE = ('optimizer', 'scheduler')  # what only a resume needs: too large to come back, and not published


def prepare(shared_zip: Path) -> None:
    """The training split of the shared CIFAR-10 zip (stored, as the JPEGs are) and the timm wheel this repo pins."""
    LEASE_DIR.mkdir(exist_ok=True)
    with zipfile.ZipFile(shared_zip) as src, zipfile.ZipFile(TRAIN_ZIP, 'w', zipfile.ZIP_STORED) as dst:
        members = [i for i in src.infolist() if i.filename.startswith('cifar10-jpg/train/')]
        for info in members:
            dst.writestr(info.filename, src.read(info))
    import timm
    subprocess.run([sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '-d', str(LEASE_DIR),
                    f'timm=={timm.__version__}'], check=True)
    print(f'{len(members)} training images -> {TRAIN_ZIP} ({TRAIN_ZIP.stat().st_size / 2 ** 20:.1f} MiB); '
          f'timm {timm.__version__} wheel -> {LEASE_DIR}')


def _train_command(recipe: str, extra: List[str], compile_backend: str) -> List[str]:
    compile_args = ['--torchcompile', compile_backend] if compile_backend else []
    return [sys.executable, '-m', 'aft_vit', 'train', '--config', recipe, '--data-dir', 'data/cifar10-jpg',
            '--val-split', '', '--no-progress', '--skip-image-check', *extra, *compile_args]


def _epoch_seconds(summary: Path) -> List[float]:
    with open(summary, newline='') as f:
        return [float(row['train_seconds']) for row in csv.DictReader(f)]


def _calibrate(recipe: str, compile_backend: str, fallback_recipe: str) -> Tuple[List[float], float, str, str]:
    """Two epochs of the recipe, timed; with a torch.compile backend that fails here, two eager ones instead, and
    where the recipe fails, two of ``fallback_recipe``. Returns the times and the recipe and backend that ran."""
    calibration = Path('/tmp/lease-calibration')
    shutil.rmtree(calibration, ignore_errors=True)
    extra = ['--epochs', '2', '--warmup-epochs', '1', '--output', str(calibration), '--experiment', 'calibration']
    start = time.monotonic()
    result = subprocess.run(_train_command(recipe, extra, compile_backend), cwd=ROOT)
    if result.returncode != 0:
        if compile_backend:
            print(f'calibration with --torchcompile {compile_backend} failed: training eagerly', flush=True)
            return _calibrate(recipe, '', fallback_recipe)
        if fallback_recipe:
            print(f'calibration of {recipe} failed: calibrating {fallback_recipe}', flush=True)
            return _calibrate(fallback_recipe, '', '')
        raise SystemExit('calibration failed')
    seconds = _epoch_seconds(calibration / 'calibration' / 'summary.csv')
    return seconds, time.monotonic() - start, recipe, compile_backend


def run(out: Path, budget_s: float, max_epochs: int, experiment: str, compile_backend: str, recipe: str = RECIPE,
        fallback_recipe: str = '') -> int:
    """Install the carried timm, unpack the images, calibrate, train, pack; all inside ``budget_s`` seconds."""
    deadline = time.monotonic() + budget_s
    site = Path('/tmp/lease-site')
    wheels = sorted(LEASE_DIR.glob('timm-*.whl'))
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps', '--no-compile',
                    '--target', str(site), *map(str, wheels)], check=True)
    os.environ['PYTHONPATH'] = os.pathsep.join([str(site), str(ROOT)])
    os.environ.setdefault('PYTHONUNBUFFERED', '1')
    with zipfile.ZipFile(TRAIN_ZIP) as z:
        z.extractall(ROOT / 'data')
    if shutil.which('nvidia-smi'):
        subprocess.run(['nvidia-smi', '-L'], check=False)

    epochs_s, calibration_s, recipe, compile_backend = _calibrate(recipe, compile_backend, fallback_recipe)
    per_epoch_s = epochs_s[-1] * 1.03 + 0.5  # the second epoch (warm caches), saving and fresh loader workers
    # start-up, plus most of what the first epoch spent beyond a warm one (compiling: mostly cached the second time)
    overhead_s = calibration_s - sum(epochs_s) + 0.6 * max(0., epochs_s[0] - epochs_s[-1])
    left_s = deadline - time.monotonic() - overhead_s - 30  # 30 s to pack the result
    epochs = max(1, min(max_epochs, int(left_s // per_epoch_s)))
    warmup = max(1, round(0.05 * epochs))
    print(f'calibration of {recipe}: {epochs_s} s per epoch, {calibration_s:.0f} s in all -> {epochs} epochs, '
          f'{warmup} warm-up', flush=True)

    command = _train_command(recipe, ['--epochs', str(epochs), '--warmup-epochs', str(warmup), '--output', OUTPUT,
                              '--experiment', experiment], compile_backend)
    try:
        subprocess.run(command, check=True, cwd=ROOT, timeout=max(1., deadline - time.monotonic() - 20))
    except subprocess.TimeoutExpired:
        print('training ran out of the budget: packing the last finished epoch (resume it with --resume)', flush=True)
    except subprocess.CalledProcessError as e:
        print(f'training stopped with exit status {e.returncode}: packing the last finished epoch', flush=True)
    return pack(ROOT / OUTPUT / experiment, out)


def pack(run_dir: Path, out: Path) -> int:
    """last.pth.tar without the optimizer state, in pieces small enough to come back, with summary.csv and args.yaml."""
    import torch
    checkpoint = torch.load(run_dir / 'last.pth.tar', map_location='cpu', weights_only=True)
    slim = {k: v for k, v in checkpoint.items() if k not in TRAINING_STATE}
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(slim, buffer)
    data = buffer.getvalue()
    for i in range(math.ceil(len(data) / PART_BYTES)):
        (out / f'weights.pth.tar.part{i}').write_bytes(data[i * PART_BYTES:(i + 1) * PART_BYTES])
    for name in ('summary.csv', 'args.yaml'):
        shutil.copy(run_dir / name, out / name)
    print(f'packed epoch {slim["epoch"]} ({len(data) / 2 ** 20:.1f} MiB) into {out}', flush=True)
    return 0


def unpack(parts_dir: Path, experiment: str) -> None:
    """Join the pieces into output/cifar10-gpu/<experiment>/last.pth.tar beside the run's summary.csv and args.yaml."""
    run_dir = ROOT / OUTPUT / experiment
    run_dir.mkdir(parents=True, exist_ok=True)
    parts = sorted(parts_dir.glob('weights.pth.tar.part*'), key=lambda p: int(p.name.rsplit('part', 1)[1]))
    if not parts:
        raise SystemExit(f'no weights.pth.tar.part* in {parts_dir}')
    tmp = run_dir / 'last.pth.tar.tmp'
    with open(tmp, 'wb') as f:
        for part in parts:
            f.write(part.read_bytes())
    tmp.replace(run_dir / 'last.pth.tar')
    for name in ('summary.csv', 'args.yaml'):
        shutil.copy(parts_dir / name, run_dir / name)
    print(f'{len(parts)} pieces -> {run_dir / "last.pth.tar"}')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    sub = parser.add_subparsers(dest='step', required=True)
    p = sub.add_parser('prepare')
    p.add_argument('--shared-zip', type=Path, default=ROOT.parent / 'shared' / 'data' / 'cifar10-jpg.zip')
    r = sub.add_parser('run')
    r.add_argument('--out', type=Path, default=Path(os.environ.get('OUT', 'output/gpu-lease')))
    r.add_argument('--budget-s', type=float, default=480., help='wall time for everything, packing included')
    r.add_argument('--max-epochs', type=int, default=300)
    r.add_argument('--experiment', default=EXPERIMENT)
    r.add_argument('--recipe', default=RECIPE)
    r.add_argument('--fallback-recipe', default='', help='trained instead where --recipe fails to calibrate')
    r.add_argument('--torchcompile', nargs='?', const='inductor', default='',
                   help='compile the model (timm train.py flag); eager training if compiling fails')
    u = sub.add_parser('unpack')
    u.add_argument('parts_dir', type=Path)
    u.add_argument('--experiment', default=EXPERIMENT)
    args = parser.parse_args()
    if args.step == 'prepare':
        prepare(args.shared_zip)
    elif args.step == 'run':
        return run(args.out, args.budget_s, args.max_epochs, args.experiment, args.torchcompile, args.recipe,
                   args.fallback_recipe)
    else:
        unpack(args.parts_dir, args.experiment)
    return 0


if __name__ == '__main__':
    sys.exit(main())
