"""``aft-vit train``: train or fine-tune any timm model (the aft ones registered) on an ImageFolder tree.

Built from timm's parts: ``create_dataset`` / ``create_loader`` (RandAugment, random erasing, repeated
augmentation), ``Mixup``, timm's losses via ``timm.task.ClassificationTask``, ``create_optimizer_v2``
(layer-wise lr decay through ``group_matcher``), ``create_scheduler_v2``, ``ModelEmaV3``. Arguments keep
the names of timm's ``train.py`` and a ``--config`` YAML uses its keys, so one recipe serves both.
Outputs land where timm's go: ``<output>/<experiment>/{last,model_best}.pth.tar``, ``summary.csv``,
``args.yaml``. Run on many processes with ``torchrun`` (gloo on CPU, nccl on GPU).

Exact resume: every epoch reseeds all RNGs from (seed, epoch, rank) and loader workers are
restarted each epoch, so a run resumed from ``last.pth.tar`` (model, optimizer, scheduler, EMA,
epoch) continues bit for bit as if it had never stopped.
"""
import argparse
import logging
import math
import os
import shlex
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from timm.data import FastCollateMixup, Mixup, create_dataset, create_loader, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import PlateauLRScheduler, create_scheduler_v2, scheduler_kwargs
from timm.task import ClassificationTask
from timm.utils import (
    NativeScaler, ParseKwargs, dispatch_clip_grad, get_outdir, init_distributed_device, random_seed, update_summary)
from timm.utils.summary import trim_summary

import aft_vit  # noqa: F401  registers the aft models
from .checkpoint import CHECKPOINT_VERSION, command_history, load_checkpoint_file, load_weights, save_atomic
from .factory import create_model_checked
from .data import check_image_folder, resolve_split_dir, training_interpolation
from .device_data import check_device_data_args, device_resident_loader
from .errors import UserInputError
from .machine import machine_description
from .precision import autocast_is_faster, time_precisions
from .evaluate import evaluate
from .size_schedule import SizeSchedule, check_model_takes_sizes, parse_size_schedule, size_at

_logger = logging.getLogger('aft_vit.train')


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group('data')
    g.add_argument('data', nargs='?', metavar='DIR', help='dataset root (same as --data-dir)')
    g.add_argument('--data-dir', metavar='DIR', help='ImageFolder root with train/ and val/ (or test/)')
    g.add_argument('--dataset', default='', help="timm dataset type ('' = ImageFolder)")
    g.add_argument('--train-split', default='train')
    g.add_argument('--val-split', default='validation', help="eval split; 'val' or 'test' folders are found too")
    g.add_argument('--train-num-samples', type=int, default=None)
    g.add_argument('--val-num-samples', type=int, default=None)
    g.add_argument('--class-map', default='')
    g.add_argument('--skip-image-check', action='store_true', help='do not read every image header before training')


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group('model')
    g.add_argument('--model', default='aft_conv_tiny')
    g.add_argument('--pretrained', action='store_true', help='start from the pretrained weights of --model')
    g.add_argument('--pretrained-path', default=None, help='start from these weights (head adapted to --num-classes)')
    g.add_argument('--initial-checkpoint', default='', help='start from this checkpoint (fine-tuning)')
    g.add_argument('--resume', default='', help='resume model, optimizer, scheduler, EMA and epoch from a checkpoint')
    g.add_argument('--no-resume-opt', action='store_true')
    g.add_argument('--num-classes', type=int, default=None, help='default: the number of class folders')
    g.add_argument('--gp', default=None, help='global pool type')
    g.add_argument('--img-size', type=int, default=None)
    g.add_argument('--size-schedule', nargs='+', default=None, metavar='EPOCH:SIZE',
                   help='progressive resizing: train at SIZE px from EPOCH on, e.g. 0:128 30:176 45:224 (the eval '
                        'split stays at the model / --img-size input size, where the schedule should end)')
    g.add_argument('--in-chans', type=int, default=None)
    g.add_argument('--input-size', type=int, nargs=3, default=None, metavar='N')
    g.add_argument('--crop-pct', type=float, default=None)
    g.add_argument('--mean', type=float, nargs='+', default=None)
    g.add_argument('--std', type=float, nargs='+', default=None)
    g.add_argument('--interpolation', default='')
    g.add_argument('-b', '--batch-size', type=int, default=128, help='per-process batch size')
    g.add_argument('-vb', '--validation-batch-size', type=int, default=None)
    g.add_argument('--grad-checkpointing', action='store_true')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    g.add_argument('--torchcompile', nargs='?', const='inductor', default=None, help='torch.compile backend')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    g.add_argument('--amp', action=argparse.BooleanOptionalAction, default=False,
                   help='mixed precision (autocast); --no-amp overrides a recipe\'s amp: true')
    g.add_argument('--amp-dtype', default='bfloat16', choices=('float16', 'bfloat16'))
    g.add_argument('--amp-auto', action='store_true',
                   help='time a training pass in float32 and in --amp-dtype autocast on this machine and train in the '
                        'faster (sets --amp); a run resumed on the machine it last ran on keeps that choice')
    g.add_argument('--device-modules', nargs='+', default=None, help='modules to import before building the model')


def _add_optimizer_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group('optimizer')
    g.add_argument('--opt', default='adamw')
    g.add_argument('--opt-eps', type=float, default=None)
    g.add_argument('--opt-betas', type=float, nargs='+', default=None)
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--weight-decay', type=float, default=0.05)
    g.add_argument('--clip-grad', type=float, default=None)
    g.add_argument('--clip-mode', default='norm')
    g.add_argument('--layer-decay', type=float, default=None)
    g.add_argument('--opt-kwargs', nargs='*', default={}, action=ParseKwargs)


def _add_schedule_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group('schedule')
    g.add_argument('--sched', default='cosine')
    g.add_argument('--sched-on-updates', action='store_true')
    g.add_argument('--lr', type=float, default=None, help='default: lr-base * global batch / lr-base-size')
    g.add_argument('--lr-base', type=float, default=5e-4)
    g.add_argument('--lr-base-size', type=int, default=512)
    g.add_argument('--lr-base-scale', default='linear', choices=('linear', 'sqrt'))
    g.add_argument('--warmup-lr', type=float, default=1e-6)
    g.add_argument('--min-lr', type=float, default=1e-5)
    g.add_argument('--epochs', type=int, default=300)
    g.add_argument('--warmup-epochs', type=int, default=5)
    g.add_argument('--warmup-prefix', action='store_true')
    g.add_argument('--cooldown-epochs', type=int, default=0)
    g.add_argument('--decay-epochs', type=float, default=90)
    g.add_argument('--decay-milestones', type=int, nargs='+', default=[90, 180, 270])
    g.add_argument('--decay-rate', type=float, default=0.1)
    g.add_argument('--patience-epochs', type=int, default=10)


def _add_augmentation_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group('augmentation and regularization')
    g.add_argument('--no-aug', action='store_true')
    g.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0])
    g.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.])
    g.add_argument('--hflip', type=float, default=0.5)
    g.add_argument('--vflip', type=float, default=0.)
    g.add_argument('--color-jitter', type=float, default=0.4)
    g.add_argument('--aa', default=None, help='auto augment policy, e.g. rand-m9-mstd0.5-inc1')
    g.add_argument('--aug-repeats', type=float, default=0, help='repeated augmentation (distributed only)')
    g.add_argument('--reprob', type=float, default=0.)
    g.add_argument('--remode', default='pixel')
    g.add_argument('--recount', type=int, default=1)
    g.add_argument('--mixup', type=float, default=0.)
    g.add_argument('--cutmix', type=float, default=0.)
    g.add_argument('--cutmix-minmax', type=float, nargs='+', default=None)
    g.add_argument('--mixup-prob', type=float, default=1.)
    g.add_argument('--mixup-switch-prob', type=float, default=0.5)
    g.add_argument('--mixup-mode', default='batch')
    g.add_argument('--mixup-off-epoch', type=int, default=0)
    g.add_argument('--smoothing', type=float, default=0.1)
    g.add_argument('--train-interpolation', default='random')
    g.add_argument('--drop', type=float, default=0.)
    g.add_argument('--drop-path', type=float, default=None)
    g.add_argument('--model-ema', action='store_true')
    g.add_argument('--model-ema-decay', type=float, default=0.9998)
    g.add_argument('--model-ema-warmup', action='store_true')


def _add_misc_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group('misc')
    g.add_argument('--seed', type=int, default=42)
    g.add_argument('-j', '--workers', type=int, default=min(4, os.cpu_count() or 1))
    g.add_argument('--pin-mem', action='store_true')
    g.add_argument('--no-prefetcher', action='store_true')
    g.add_argument('--device-data', action='store_true',
                   help='decode the training images once, keep them on the device and crop / flip / mix there '
                        '(small data sets on a GPU, where loader workers cannot keep up)')
    g.add_argument('--output', default='output', help='parent folder of the experiment folder')
    g.add_argument('--experiment', default='', help='experiment folder name (default: date-model-size)')
    g.add_argument('--eval-metric', default='top1')
    g.add_argument('--log-interval', type=int, default=50, help='progress bar refresh, in batches')
    g.add_argument('--no-progress', action='store_true', help='no progress bar (logs per epoch only)')


def build_parser() -> argparse.ArgumentParser:
    """The arguments, named (and defaulted) as in timm's train.py; a subset of it, plus ``--skip-image-check``."""
    parser = argparse.ArgumentParser(prog='aft-vit train', description=__doc__.split('\n\n')[0])
    parser.add_argument('-c', '--config', default='', metavar='FILE', help='YAML of defaults, keys as timm train.py')
    _add_data_args(parser)
    _add_model_args(parser)
    _add_optimizer_args(parser)
    _add_schedule_args(parser)
    _add_augmentation_args(parser)
    _add_misc_args(parser)
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` with a ``--config`` YAML as defaults (command-line flags win), as timm's train.py does."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        try:
            with open(pre.config, encoding='utf-8') as f:
                cfg = yaml.safe_load(f) or {}
        except OSError as e:
            raise UserInputError(f'cannot read config {pre.config}: {e.strerror}') from None
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(cfg) - known)
        if unknown:
            _logger.warning(f'{pre.config}: keys not used by aft-vit train (timm train.py only): {", ".join(unknown)}')
        parser.set_defaults(**{k: v for k, v in cfg.items() if k in known})
    args = parser.parse_args(argv)
    args.data_dir = args.data_dir or args.data
    if not args.data_dir:
        raise UserInputError('no dataset: pass --data-dir DIR (an ImageFolder root with train/ and val/ or test/)')
    if args.device_data:
        check_device_data_args(args)  # before any image is read
    return args


def _class_folders(args: argparse.Namespace) -> Tuple[Path, Optional[Path], List[str]]:
    """The train and eval split folders, checked, and the class names (sorted train folder names)."""
    train_dir = resolve_split_dir(args.data_dir, args.train_split)
    eval_dir = resolve_split_dir(args.data_dir, args.val_split) if args.val_split else None
    label_names = check_image_folder(train_dir, verify_images=not args.skip_image_check)
    if eval_dir is not None:
        eval_names = check_image_folder(eval_dir, verify_images=not args.skip_image_check)
        if eval_names != label_names:
            raise UserInputError(f'class folders of {eval_dir} differ from {train_dir}: '
                                 f'{sorted(set(eval_names) ^ set(label_names))}')
    return train_dir, eval_dir, label_names


def _create_model(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    kwargs = dict(args.model_kwargs)
    if args.img_size is not None:
        kwargs.setdefault('img_size', args.img_size)
    if args.pretrained_path:
        kwargs['pretrained_cfg_overlay'] = dict(file=args.pretrained_path, num_classes=-1)
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else 3)
    model = create_model_checked(
        args.model,
        pretrained=args.pretrained or bool(args.pretrained_path),
        num_classes=num_classes,
        in_chans=in_chans,
        drop_rate=args.drop,
        drop_path_rate=args.drop_path,
        global_pool=args.gp,
        **kwargs,
    )
    if args.initial_checkpoint:
        checkpoint = load_checkpoint_file(args.initial_checkpoint, args.model)
        load_weights(model, checkpoint, args.initial_checkpoint, args.model)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _train_loss(args: argparse.Namespace, mixup_active: bool) -> torch.nn.Module:
    if mixup_active:
        return SoftTargetCrossEntropy()  # mixup folds label smoothing into its soft targets
    if args.smoothing:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()


def _is_primary(args: argparse.Namespace) -> bool:
    return args.rank == 0


def _resolved_lr(args: argparse.Namespace) -> float:
    """--lr, else --lr-base scaled by the global batch size (timm's rule)."""
    if args.lr is not None:
        return args.lr
    ratio = args.batch_size * args.world_size / args.lr_base_size
    return args.lr_base * (math.sqrt(ratio) if args.lr_base_scale == 'sqrt' else ratio)


def _amp(args: argparse.Namespace, device: torch.device) -> Tuple[Callable, Optional[NativeScaler]]:
    """The autocast context (a no-op without --amp) and, for float16 on CUDA only, a loss scaler."""
    if not args.amp:
        return nullcontext, None
    amp_dtype = getattr(torch, args.amp_dtype)
    scaler = NativeScaler(device=device.type) if device.type == 'cuda' and amp_dtype == torch.float16 else None
    return partial(torch.autocast, device_type=device.type, dtype=amp_dtype), scaler


class _Loaders(NamedTuple):
    train: Any
    eval: Optional[Any]
    mixup_fn: Optional[Mixup]  # mixup applied in the loop (no prefetcher)
    collate_mixup: Optional[FastCollateMixup]  # mixup applied by the prefetcher's collate
    num_train_images: int
    train_at: Callable[[int], Any]  # the train loader at another square size (progressive resizing)

    @property
    def mixup_active(self) -> bool:
        return self.mixup_fn is not None or self.collate_mixup is not None

    def stop_mixup(self) -> None:
        for mixer in (self.mixup_fn, self.collate_mixup):
            if mixer is not None:
                mixer.mixup_enabled = False


def _build_loaders(args: argparse.Namespace, train_dir: Path, eval_dir: Optional[Path], data_config: Dict[str, Any],
                   num_classes: int, device: torch.device) -> _Loaders:
    """timm's datasets and loaders (augmentation, mixup / cutmix, distributed sampling) for both splits."""
    use_prefetcher = device.type == 'cuda' and not args.no_prefetcher and not args.device_data
    dataset_train = create_dataset(args.dataset, root=str(train_dir), split=args.train_split, is_training=True,
                                   class_map=args.class_map, num_samples=args.train_num_samples, seed=args.seed)
    mixup_fn, collate_mixup = None, None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                          prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                          label_smoothing=args.smoothing, num_classes=num_classes)
        if use_prefetcher:
            collate_mixup = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)
    common = dict(mean=data_config['mean'], std=data_config['std'], pin_memory=args.pin_mem, device=device,
                  distributed=args.distributed, use_prefetcher=use_prefetcher, num_workers=args.workers,
                  persistent_workers=False)  # fresh workers per epoch: their RNG is reseeded with the epoch
    def train_loader(input_size: Sequence[int]) -> Any:
        return create_loader(  # sets dataset_train's transform for this size; only the newest loader is used
            dataset_train, input_size=tuple(input_size), batch_size=args.batch_size, is_training=True,
            no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, scale=args.scale,
            ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
            auto_augment=args.aa, num_aug_repeats=int(args.aug_repeats) if args.distributed else 0,
            interpolation=training_interpolation(args, data_config),
            collate_fn=collate_mixup, **common)

    if args.device_data:  # decoded once onto the device, augmented there per batch
        loader_train = device_resident_loader(args, dataset_train, data_config, device)
        train_at = loader_train.resized
    else:
        loader_train = train_loader(data_config['input_size'])
        train_at = lambda size: train_loader((data_config['input_size'][0], size, size))  # noqa: E731
    if len(loader_train) == 0:
        raise UserInputError(f'{train_dir} has {len(dataset_train)} images: fewer than one batch of '
                             f'{args.batch_size} per process; lower -b')
    loader_eval = None
    if eval_dir is not None:
        dataset_eval = create_dataset(args.dataset, root=str(eval_dir), split=args.val_split, is_training=False,
                                      class_map=args.class_map, num_samples=args.val_num_samples)
        loader_eval = create_loader(
            dataset_eval, input_size=data_config['input_size'],
            batch_size=args.validation_batch_size or args.batch_size, is_training=False,
            interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'], **common)
    return _Loaders(loader_train, loader_eval, mixup_fn, collate_mixup, len(dataset_train), train_at)


class _Optimization(NamedTuple):
    task: ClassificationTask
    optimizer: torch.optim.Optimizer
    scheduler: Any
    num_epochs: int
    amp_autocast: Callable
    loss_scaler: Optional[NativeScaler]


def _build_optimization(args: argparse.Namespace, model: torch.nn.Module, loaders: _Loaders, lr: float,
                        device: torch.device) -> _Optimization:
    """The training task (loss, EMA), optimizer and schedule, from timm's factories."""
    task = ClassificationTask(model, criterion=_train_loss(args, loaders.mixup_active), device=device,
                              verbose=_is_primary(args))
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup, device=device)
    optimizer = create_optimizer_v2(
        task.get_trainable_module(), **{**optimizer_kwargs(cfg=args), 'lr': lr}, **args.opt_kwargs)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric='loss' in args.eval_metric),
        updates_per_epoch=len(loaders.train))
    return _Optimization(task, optimizer, scheduler, num_epochs, *_amp(args, device))


def _train_one_epoch(epoch: int, opt: _Optimization, loaders: _Loaders, args: argparse.Namespace,
                     device: torch.device, num_updates: int, progress: bool,
                     record_size: bool = False) -> Tuple[Dict[str, float], int]:
    """One pass over the train loader; its mean loss, rate and time, and with ``record_size`` the size its batches
    had (a summary.csv column, ``train_img_size``, only where a size schedule makes it vary)."""
    task, optimizer, loss_scaler = opt.task, opt.optimizer, opt.loss_scaler
    model = task.get_trainable_module()
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    samples = 0
    start = time.perf_counter()
    bar = tqdm(loaders.train, desc=f'epoch {epoch}', disable=not progress, mininterval=1.0, leave=False)
    for step, (images, target) in enumerate(bar):
        images, target = images.to(device), target.to(device)
        if loaders.mixup_fn is not None:
            images, target = loaders.mixup_fn(images, target)
        with opt.amp_autocast():
            loss = task(images, target)['loss']
        optimizer.zero_grad(set_to_none=True)
        if loss_scaler is not None:
            loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                        parameters=model.parameters())
        else:
            loss.backward()
            if args.clip_grad is not None:
                dispatch_clip_grad(model.parameters(), value=args.clip_grad, mode=args.clip_mode)
            optimizer.step()
        num_updates += 1
        task.update_ema(step=num_updates)
        opt.scheduler.step_update(num_updates=num_updates)
        loss_sum += loss.detach().double() * images.shape[0]
        samples += images.shape[0]
        if progress and (step % args.log_interval == 0 or step == len(loaders.train) - 1):
            rate = samples * args.world_size / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f'{loss.item():.4f}', lr=f'{optimizer.param_groups[0]["lr"]:.2e}',
                            img_s=f'{rate:.0f}')
    totals = torch.stack([loss_sum, torch.tensor(float(samples), dtype=torch.float64, device=device)])
    if args.distributed:
        dist.all_reduce(totals)
    elapsed = time.perf_counter() - start
    metrics = dict(loss=(totals[0] / totals[1].clamp_min(1)).item(), img_per_sec=totals[1].item() / elapsed,
                   seconds=elapsed)
    if record_size:
        metrics['img_size'] = int(images.shape[-1])
    return metrics, num_updates


def _plain_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The arguments as plain values: loadable with ``weights_only=True`` and dumpable as YAML."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}


def _checkpoint_state(epoch: int, opt: _Optimization, recorded_args: Dict[str, Any], metric: Optional[float],
                      label_names: List[str], wall_seconds: float) -> Dict[str, Any]:
    state = dict(
        epoch=epoch,
        wall_seconds=wall_seconds,
        arch=recorded_args['model'],
        version=CHECKPOINT_VERSION,
        optimizer=opt.optimizer.state_dict(),
        scheduler=opt.scheduler.state_dict(),
        metric=metric,
        label_names=list(label_names),
        args=recorded_args,
    )
    state.update(opt.task.get_checkpoint_state())
    if opt.task.has_ema():
        state.update(opt.task.get_checkpoint_state(ema=True))
    if opt.loss_scaler is not None:
        state[opt.loss_scaler.state_dict_key] = opt.loss_scaler.state_dict()
    return state


class _History(NamedTuple):
    """The commands that trained a checkpoint, with the machine and the precision of each (older checkpoints:
    fewer machines or precisions than commands)."""
    commands: List[str] = []
    machines: List[str] = []
    precisions: List[str] = []  # 'float32' or '<dtype> autocast'


def _training_history(checkpoint: Dict[str, Any]) -> _History:
    trained_with = checkpoint.get('args') or {}
    return _History(command_history(trained_with), list(trained_with.get('machine_history') or []),
                    list(trained_with.get('precision_history') or []))


class _Resumed(NamedTuple):
    """Where a run starts: the epoch, the best metric so far, and the history and wall time (training and
    evaluation, summed over epochs) that produced the checkpoint: a model card reports all of them."""
    start_epoch: int = 0
    best_metric: Optional[float] = None
    history: _History = _History()
    wall_seconds: float = 0.


def _resume(args: argparse.Namespace, opt: _Optimization, checkpoint: Dict[str, Any], history: _History) -> _Resumed:
    """Restore the training state of ``checkpoint``, the file ``args.resume`` loaded (``history``: its commands)."""
    if 'state_dict' not in checkpoint:
        raise UserInputError(f'{args.resume} holds no training state (no state_dict): use --initial-checkpoint')
    task = opt.task
    load_weights(task.get_trainable_module(), checkpoint, args.resume, args.model)
    if task.has_ema() and checkpoint.get('state_dict_ema') is not None:
        load_weights(task.get_trainable_module(ema=True).module, checkpoint, args.resume, args.model, use_ema=True)
    if not args.no_resume_opt and 'optimizer' in checkpoint:
        opt.optimizer.load_state_dict(checkpoint['optimizer'])
        if 'scheduler' in checkpoint and isinstance(opt.scheduler, PlateauLRScheduler):
            # only the plateau schedule has history (its best metric, bad-epoch count); the others are functions of
            # the epoch and this run's arguments, rebuilt below, so a resume with a larger --epochs extends the run
            opt.scheduler.load_state_dict(checkpoint['scheduler'])
        if opt.loss_scaler is not None and opt.loss_scaler.state_dict_key in checkpoint:
            opt.loss_scaler.load_state_dict(checkpoint[opt.loss_scaler.state_dict_key])
    start_epoch = checkpoint.get('epoch', -1) + (1 if checkpoint.get('version', 1) > 1 else 0)
    return _Resumed(start_epoch, checkpoint.get('metric'), history, float(checkpoint.get('wall_seconds') or 0.))


def _precision_name(args: argparse.Namespace) -> str:
    return f'{args.amp_dtype} autocast' if args.amp else 'float32'


def _amp_auto(args: argparse.Namespace, model: torch.nn.Module, input_size: Sequence[int], num_classes: int,
              device: torch.device, resumed_history: Optional[_History] = None) -> bool:
    """--amp-auto: whether autocast trains faster than float32 here (:mod:`aft_vit.precision`). A run resumed on
    the machine it last ran on (``resumed_history``) keeps the precision it had there: timing noise must not
    change the arithmetic of an exact resume. Rank 0 measures and the others follow it."""
    if resumed_history is not None:
        machines, precisions = resumed_history.machines, resumed_history.precisions
        if machines and len(precisions) == len(machines) and machines[-1] == machine_description():
            _logger.info(f'--amp-auto: resuming on the machine of the last session, in its precision ({precisions[-1]})')
            return precisions[-1] != 'float32'
    use_amp = False
    if _is_primary(args):
        times = time_precisions(model, input_size, args.batch_size, num_classes, getattr(torch, args.amp_dtype))
        use_amp = autocast_is_faster(times)
        measured = ', '.join(f'{name} {seconds * 1000:.0f} ms' for name, seconds in times.items())
        _logger.info(f'--amp-auto: one training pass of {args.batch_size} images at {tuple(input_size)}: {measured}; '
                     f'training in {"autocast" if use_amp else "float32"}')
    if args.distributed:
        flag = torch.tensor([float(use_amp)], device=device)
        dist.broadcast(flag, src=0)
        use_amp = bool(flag.item())
    return use_amp


def _output_dir(args: argparse.Namespace, input_size: Sequence[int], start_epoch: int) -> Path:
    """The experiment folder: a resumed run continues in its own folder, a new run never reuses one."""
    experiment = args.experiment or '-'.join([
        time.strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(input_size[-1])])
    output_dir = Path(args.output) / experiment
    if args.resume and Path(args.resume).resolve().parent == output_dir.resolve():
        trim_summary(str(output_dir / 'summary.csv'), start_epoch)  # continue the run in its own folder
        return output_dir
    return Path(get_outdir(args.output, experiment, inc=True))  # never mix two runs: name-1, name-2


def _evaluate_epoch(opt: _Optimization, eval_model: torch.nn.Module, loaders: _Loaders, args: argparse.Namespace,
                    device: torch.device, progress: bool) -> Dict[str, float]:
    """Metrics of the model (and its EMA, as ``ema_*``) on the eval split; empty without one."""
    if loaders.eval is None:
        return {}
    start = time.perf_counter()
    kwargs = dict(device=device, amp_autocast=opt.amp_autocast, distributed=args.distributed)
    metrics = evaluate(eval_model, loaders.eval, progress=progress, **kwargs)
    if opt.task.has_ema():
        ema_metrics = evaluate(opt.task.get_eval_model(ema=True), loaders.eval, **kwargs)
        metrics.update({f'ema_{k}': v for k, v in ema_metrics.items()})
    metrics['seconds'] = time.perf_counter() - start
    return metrics


def _save_epoch(output_dir: Path, epoch: int, opt: _Optimization, recorded_args: Dict[str, Any],
                train_metrics: Dict[str, float], eval_metrics: Dict[str, float], metric: Optional[float],
                improved: bool, label_names: List[str], wall_seconds: float) -> None:
    """summary.csv row, then last.pth.tar (and model_best.pth.tar), then one log line."""
    # the summary row first: a kill before the checkpoint makes resume redo this epoch and trim the row
    update_summary(epoch, train_metrics, eval_metrics, str(output_dir / 'summary.csv'),
                   lr=opt.optimizer.param_groups[0]['lr'])
    state = _checkpoint_state(epoch, opt, recorded_args, metric, label_names, wall_seconds)
    save_atomic(state, output_dir / 'last.pth.tar')
    if improved or not (output_dir / 'model_best.pth.tar').exists():
        save_atomic(state, output_dir / 'model_best.pth.tar')
    line = f'epoch {epoch}: train loss {train_metrics["loss"]:.4f} ({train_metrics["img_per_sec"]:.0f} img/s)'
    if eval_metrics:
        line += (f', eval top1 {eval_metrics["top1"]:.2f} top5 {eval_metrics["top5"]:.2f} '
                 f'loss {eval_metrics["loss"]:.4f}')
    print(line, flush=True)


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run training; returns the final epoch's metrics and the output folder. ``args`` is not modified."""
    for module in args.device_modules or []:
        __import__(module)
    args = argparse.Namespace(**vars(args))  # init_distributed_device records rank / world size on its argument
    device = init_distributed_device(args)
    progress = _is_primary(args) and not args.no_progress
    train_dir, eval_dir, label_names = _class_folders(args)
    num_classes = args.num_classes or len(label_names)
    size_schedule = parse_size_schedule(args.size_schedule) if args.size_schedule else None

    random_seed(args.seed, args.rank)
    model = _create_model(args, num_classes)
    data_config = resolve_data_config(vars(args), model=model, verbose=_is_primary(args))
    model.to(device)
    if size_schedule:
        check_model_takes_sizes(model, size_schedule, data_config['input_size'][0])
    loaders = _build_loaders(args, train_dir, eval_dir, data_config, num_classes, device)
    resume_checkpoint = load_checkpoint_file(args.resume, args.model) if args.resume else None
    history = _training_history(resume_checkpoint) if resume_checkpoint is not None else None
    if args.amp_auto:
        train_size = size_at(size_schedule, 0) if size_schedule else data_config['input_size'][-1]
        args.amp = _amp_auto(args, model, (data_config['input_size'][0], train_size, train_size), num_classes, device,
                             history)
    lr = _resolved_lr(args)
    opt = _build_optimization(args, model, loaders, lr, device)

    resumed = _resume(args, opt, resume_checkpoint, history) if resume_checkpoint is not None else _Resumed()
    if resumed.start_epoch > 0:  # timm's schedulers are functions of the epoch / update count: set them to where we are
        opt.scheduler.step(resumed.start_epoch)
        opt.scheduler.step_update(resumed.start_epoch * len(loaders.train))
    # what checkpoints and args.yaml record: the arguments with the values derived from them filled in, and the
    # commands (with the machine each ran on) that trained the weights
    this_run = [args.command] if getattr(args, 'command', None) else []
    previous = resumed.history
    recorded_args = {**_plain_args(args), 'lr': lr, 'num_classes': num_classes,
                     'command_history': previous.commands + this_run,
                     'machine_history': previous.machines + [machine_description() for _ in this_run],
                     'precision_history': previous.precisions + [_precision_name(args) for _ in this_run]}

    if args.torchcompile:
        opt.task.compile(backend=args.torchcompile)
    if args.distributed:
        opt.task.prepare_distributed(device_ids=[device.index] if device.type == 'cuda' else None)

    output_dir = None
    if _is_primary(args):
        output_dir = _output_dir(args, data_config['input_size'], resumed.start_epoch)
        with open(output_dir / 'args.yaml', 'w', encoding='utf-8') as f:
            yaml.safe_dump(recorded_args, f)
        _logger.info(f'{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, '
                     f'{loaders.num_train_images} train images, lr {lr:.3g}, {opt.num_epochs} epochs -> {output_dir}')
    metrics = _run_epochs(args, opt, loaders, device, resumed, output_dir, recorded_args, label_names, progress,
                          size_schedule)
    if args.distributed:
        divergence = _rank_divergence(opt.task.get_trainable_module())
        if _is_primary(args):
            print(f'parameters across {args.world_size} ranks: max |difference| {divergence:g}', flush=True)
        metrics['rank_divergence'] = divergence
        dist.barrier()
        dist.destroy_process_group()
    return metrics


def _run_epochs(args: argparse.Namespace, opt: _Optimization, loaders: _Loaders, device: torch.device,
                resumed: _Resumed, output_dir: Optional[Path], recorded_args: Dict[str, Any], label_names: List[str],
                progress: bool, size_schedule: Optional[SizeSchedule] = None) -> Dict[str, Any]:
    """The epoch loop: (resize), train, evaluate, step the schedule, save (primary process only)."""
    decreasing = 'loss' in args.eval_metric
    eval_model = opt.task.get_eval_model()
    metrics: Dict[str, Any] = {}
    best_metric, wall_seconds = resumed.best_metric, resumed.wall_seconds
    num_updates = resumed.start_epoch * len(loaders.train)
    train_size = None  # the train loader is built at the schedule's size of the first epoch run here
    for epoch in range(resumed.start_epoch, opt.num_epochs):
        epoch_start = time.perf_counter()
        random_seed(args.seed + epoch, args.rank)  # every epoch's randomness is a function of (seed, epoch, rank)
        if size_schedule and size_at(size_schedule, epoch) != train_size:
            train_size = size_at(size_schedule, epoch)
            loaders = loaders._replace(train=loaders.train_at(train_size))
        if hasattr(loaders.train.sampler, 'set_epoch'):
            loaders.train.sampler.set_epoch(epoch)
        if loaders.mixup_active and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            loaders.stop_mixup()
        train_metrics, num_updates = _train_one_epoch(epoch, opt, loaders, args, device, num_updates, progress,
                                                      record_size=bool(size_schedule))
        eval_metrics = _evaluate_epoch(opt, eval_model, loaders, args, device, progress)
        metric = eval_metrics.get(args.eval_metric, train_metrics['loss'] if decreasing else None)
        opt.scheduler.step(epoch + 1, metric)
        if _is_primary(args):
            improved = metric is not None and (
                best_metric is None or (metric < best_metric if decreasing else metric > best_metric))
            best_metric = metric if improved else best_metric
            wall_seconds += time.perf_counter() - epoch_start
            _save_epoch(output_dir, epoch, opt, recorded_args, train_metrics, eval_metrics, metric, improved,
                        label_names, wall_seconds)
        metrics = dict(epoch=epoch, train=train_metrics, eval=eval_metrics)
    metrics['output_dir'] = str(output_dir) if output_dir else None
    metrics['best_metric'] = best_metric
    return metrics


def _rank_divergence(model: torch.nn.Module) -> float:
    """Largest difference between any rank's parameters and rank 0's (0 when DDP kept them in step)."""
    flat = torch.cat([p.detach().flatten().float() for p in model.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    diff = (flat - reference).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.command = 'aft-vit train ' + shlex.join(argv)  # recorded in checkpoints and model cards
    train(args)
    return 0
