"""``aft-vit eval``: top-1, top-5, loss and img/s of a model on an ImageFolder split.

The model is a registry name (with a pretrained tag), ``hf-hub:ORG/NAME``, ``local-dir:PATH``, or a
training checkpoint (``--checkpoint``). A checkpoint written by ``aft-vit train`` carries its
arguments, so model, classes, input size and normalization default to the ones it was trained with.
"""
import argparse
import json
import os
import sys
import time
from contextlib import nullcontext
from functools import partial
from typing import Any, Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from timm.data import create_dataset, create_loader, resolve_data_config
from timm.task import ClassificationEvaluator, evaluation_sample_limit
from timm.utils import ParseKwargs

import aft_vit  # noqa: F401  registers the aft models
from .checkpoint import load_checkpoint_file
from .data import check_image_folder, resolve_split_dir
from .errors import UserInputError
from .factory import create_model_checked, load_weights

# arguments a training checkpoint supplies when they are not given on the command line
_FROM_TRAINING = ('model', 'model_kwargs', 'num_classes', 'img_size', 'in_chans', 'input_size', 'crop_pct', 'mean',
                  'std', 'interpolation')


@torch.no_grad()
def evaluate(model, loader, device=torch.device('cpu'), amp_autocast=nullcontext, distributed: bool = False,
             progress: bool = False, desc: str = 'eval') -> Dict[str, float]:
    """Top-1, top-5 and cross-entropy of ``model`` over ``loader`` (timm's ClassificationEvaluator), and img/s."""
    model.eval()
    evaluator = ClassificationEvaluator(device=device, max_samples=evaluation_sample_limit(loader))
    start, seen = time.perf_counter(), 0
    for images, target in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images, target = images.to(device), target.to(device)
        with amp_autocast():
            output = model(images)
        evaluator.update(output, target)
        seen += images.shape[0]
    metrics = dict(evaluator.compute(distributed=distributed))
    metrics['img_per_sec'] = seen / max(time.perf_counter() - start, 1e-9)
    return metrics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='aft-vit eval', description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default=None, help='registry name[.tag], hf-hub:ORG/NAME or local-dir:PATH')
    parser.add_argument('--checkpoint', default='', help='weights to evaluate (a training checkpoint or state dict)')
    parser.add_argument('--use-ema', action='store_true', help="use the checkpoint's EMA weights")
    parser.add_argument('--data-dir', required=True, help='ImageFolder root')
    parser.add_argument('--split', default='validation', help="split folder ('val' or 'test' are found too)")
    parser.add_argument('--num-classes', type=int, default=None)
    parser.add_argument('--model-kwargs', nargs='*', default=None, action=ParseKwargs)
    parser.add_argument('--img-size', type=int, default=None)
    parser.add_argument('--in-chans', type=int, default=None)
    parser.add_argument('--input-size', type=int, nargs=3, default=None)
    parser.add_argument('--crop-pct', type=float, default=None)
    parser.add_argument('--mean', type=float, nargs='+', default=None)
    parser.add_argument('--std', type=float, nargs='+', default=None)
    parser.add_argument('--interpolation', default=None)
    parser.add_argument('-b', '--batch-size', type=int, default=128)
    parser.add_argument('-j', '--workers', type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--amp', action='store_true')
    parser.add_argument('--amp-dtype', default='bfloat16', choices=('float16', 'bfloat16'))
    parser.add_argument('--json', default='', metavar='FILE', help='also write the results to this JSON file')
    parser.add_argument('--no-progress', action='store_true')
    return parser


def load_model(
        args: argparse.Namespace,
        checkpoint: Optional[Dict[str, Any]] = None,
) -> Tuple[torch.nn.Module, Optional[Dict[str, Any]]]:
    """The model named by ``args`` with its weights; arguments a training checkpoint carries fill the gaps.

    ``checkpoint``: the already loaded contents of ``args.checkpoint``, if the caller has them.
    """
    if checkpoint is None and args.checkpoint:
        checkpoint = load_checkpoint_file(args.checkpoint)
    trained_with = (checkpoint or {}).get('args') or {}
    for key in _FROM_TRAINING:
        if getattr(args, key) is None and trained_with.get(key) is not None:
            setattr(args, key, trained_with[key])
    if not args.model:
        raise UserInputError('no model: pass --model NAME (or a --checkpoint written by aft-vit train)')
    kwargs = dict(args.model_kwargs or {})
    if args.img_size is not None:
        kwargs.setdefault('img_size', args.img_size)
    if args.num_classes is not None:
        kwargs['num_classes'] = args.num_classes
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else None)
    if in_chans is not None:
        kwargs['in_chans'] = in_chans
    model = create_model_checked(args.model, pretrained=checkpoint is None, **kwargs)
    if checkpoint is not None:
        load_weights(model, args.checkpoint, args.model, use_ema=args.use_ema, checkpoint=checkpoint)
    return model, checkpoint


def run(args: argparse.Namespace, model: Optional[torch.nn.Module] = None) -> Dict[str, Any]:
    """Evaluate on ``args.split``; returns the metrics and the data config the images were prepared with."""
    split_dir = resolve_split_dir(args.data_dir, args.split)
    classes = check_image_folder(split_dir, verify_images=False)
    if model is None:
        model, _ = load_model(args)
    if model.num_classes != len(classes):
        raise UserInputError(f'{args.model} predicts {model.num_classes} classes but {split_dir} has {len(classes)} '
                             'class folders; pass --num-classes or evaluate on the matching dataset')

    device = torch.device(args.device)
    model.to(device)
    data_config = resolve_data_config(vars(args), model=model)
    dataset = create_dataset('', root=str(split_dir), split=args.split, is_training=False)
    loader = create_loader(dataset, input_size=data_config['input_size'], batch_size=args.batch_size,
                           interpolation=data_config['interpolation'], mean=data_config['mean'],
                           std=data_config['std'], crop_pct=data_config['crop_pct'], num_workers=args.workers,
                           device=device, use_prefetcher=False)
    amp = partial(torch.autocast, device_type=device.type, dtype=getattr(torch, args.amp_dtype)) if args.amp \
        else nullcontext
    metrics = evaluate(model, loader, device=device, amp_autocast=amp, progress=not args.no_progress)
    return dict(model=args.model, checkpoint=args.checkpoint or None, split=str(split_dir), images=len(dataset),
                data_config=data_config, **metrics)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    results = run(args)
    print(f'{results["model"]} on {results["split"]} ({results["images"]} images): top1 {results["top1"]:.3f} '
          f'top5 {results["top5"]:.3f} loss {results["loss"]:.4f} ({results["img_per_sec"]:.1f} img/s)')
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as f:
            json.dump({k: v for k, v in results.items() if k != 'data_config'}, f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
