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
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import torch
from tqdm import tqdm

from timm.data import create_dataset, create_loader, resolve_data_config
from timm.task import ClassificationEvaluator, evaluation_sample_limit
from timm.utils import ParseKwargs

import aft_vit  # noqa: F401  registers the aft models
from .checkpoint import load_checkpoint_file, load_weights
from .data import check_image_folder, resolve_split_dir
from .errors import UserInputError
from .factory import create_model_checked

# the arguments that prepare images (timm's resolve_data_config keys), from the command line or a training run
DATA_ARGS = ('in_chans', 'input_size', 'img_size', 'crop_pct', 'mean', 'std', 'interpolation')


@torch.no_grad()
def evaluate(model, loader, device=torch.device('cpu'), amp_autocast=nullcontext, distributed: bool = False,
             progress: bool = False, desc: str = 'eval', hflip_tta: bool = False) -> Dict[str, float]:
    """Top-1, top-5 and cross-entropy of ``model`` over ``loader`` (timm's ClassificationEvaluator), and img/s.

    ``hflip_tta``: test-time augmentation by mirroring: the logits are the mean of the image's and its left-right
    mirror's (the flip the training augmentation used), at twice the cost."""
    model.eval()
    evaluator = ClassificationEvaluator(device=device, max_samples=evaluation_sample_limit(loader))
    start, seen = time.perf_counter(), 0
    for images, target in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images, target = images.to(device), target.to(device)
        with amp_autocast():
            output = model(images)
            if hflip_tta:
                output = (output + model(images.flip(-1))) / 2
        evaluator.update(output, target)
        seen += images.shape[0]
    metrics = dict(evaluator.compute(distributed=distributed))
    metrics['img_per_sec'] = seen / max(time.perf_counter() - start, 1e-9)
    return metrics


def add_model_source_args(parser: argparse.ArgumentParser, verb: str) -> None:
    """--model / --checkpoint / --pretrained / --use-ema / --num-classes: the arguments of :func:`load_model`,
    shared by the commands that take a model with its weights."""
    parser.add_argument('--model', default=None, help='registry name[.tag], hf-hub:ORG/NAME or local-dir:PATH')
    parser.add_argument('--checkpoint', default='', help=f'weights to {verb} (a training checkpoint or state dict)')
    parser.add_argument('--pretrained', action='store_true', help="the model's published weights (what --model "
                        'loads without --checkpoint; as in timm validate.py / inference.py)')
    parser.add_argument('--use-ema', action='store_true', help="use the checkpoint's EMA weights")
    parser.add_argument('--num-classes', type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='aft-vit eval', description=__doc__.split('\n\n')[0])
    add_model_source_args(parser, 'evaluate')
    parser.add_argument('--data-dir', required=True, help='ImageFolder root')
    parser.add_argument('--split', default='validation', help="split folder ('val' or 'test' are found too)")
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
    parser.add_argument('--hflip-tta', action='store_true',
                        help='test-time augmentation: average the logits of each image and its left-right mirror '
                             '(twice the cost)')
    parser.add_argument('--json', default='', metavar='FILE', help='also write the results to this JSON file')
    parser.add_argument('--no-progress', action='store_true')
    return parser


class LoadedModel(NamedTuple):
    """A model with its weights, and where they came from."""
    model: torch.nn.Module
    name: str
    checkpoint: Optional[Dict[str, Any]]  # the checkpoint file's contents (None for pretrained weights)
    trained_with: Dict[str, Any]  # the training arguments the checkpoint carries ({} if none)

    def data_config(self, **given: Any) -> Dict[str, Any]:
        """timm's data config for the model: ``given`` values (not None) win, then the training run's, then the
        model's pretrained cfg. Keys: those of :data:`DATA_ARGS`."""
        args = {k: self.trained_with.get(k) for k in DATA_ARGS}
        args.update({k: v for k, v in given.items() if v is not None})
        return resolve_data_config(args, model=self.model)


def load_model(
        model: Optional[str] = None,
        checkpoint: str = '',
        *,
        use_ema: bool = False,
        num_classes: Optional[int] = None,
        img_size: Optional[int] = None,
        in_chans: Optional[int] = None,
        input_size: Optional[Sequence[int]] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        checkpoint_data: Optional[Dict[str, Any]] = None,
) -> LoadedModel:
    """The model named ``model`` with its weights: ``checkpoint``'s, else its pretrained ones.

    A checkpoint written by ``aft-vit train`` carries its arguments: the model name, model kwargs, classes and
    input size default to those (arguments given here win). ``checkpoint_data``: the already loaded contents of
    ``checkpoint``, if the caller has them. ``use_ema``: the checkpoint's EMA weights (aft_vit.checkpoint).
    """
    if checkpoint_data is None and checkpoint:
        checkpoint_data = load_checkpoint_file(checkpoint, model)
    trained_with = (checkpoint_data or {}).get('args') or {}

    def given_or_trained(value: Any, key: str) -> Any:
        return value if value is not None else trained_with.get(key)

    name = given_or_trained(model, 'model')
    if not name:
        raise UserInputError('no model: pass --model NAME (or a --checkpoint written by aft-vit train)')
    kwargs = dict(given_or_trained(model_kwargs, 'model_kwargs') or {})
    img_size = given_or_trained(img_size, 'img_size')
    if img_size is not None:
        kwargs.setdefault('img_size', img_size)
    num_classes = given_or_trained(num_classes, 'num_classes')
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    input_size = given_or_trained(input_size, 'input_size')
    in_chans = given_or_trained(in_chans, 'in_chans') or (input_size[0] if input_size else None)
    if in_chans is not None:
        kwargs['in_chans'] = in_chans
    net = create_model_checked(name, pretrained=checkpoint_data is None, **kwargs)
    if checkpoint_data is not None:
        load_weights(net, checkpoint_data, checkpoint or 'the checkpoint', name, use_ema=use_ema)
    return LoadedModel(net, name, checkpoint_data, trained_with)


def run(
        loaded: LoadedModel,
        data_dir: str,
        split: str = 'validation',
        *,
        batch_size: int = 128,
        workers: int = 2,
        device: str = 'cpu',
        amp_dtype: Optional[str] = None,
        data_args: Optional[Dict[str, Any]] = None,
        progress: bool = True,
        hflip_tta: bool = False,
) -> Dict[str, Any]:
    """Evaluate ``loaded`` on ``split``; returns the metrics and the data config the images were prepared with.

    ``amp_dtype``: 'bfloat16' or 'float16' autocast (None: off). ``data_args``: :data:`DATA_ARGS` overrides.
    ``hflip_tta``: average the logits of each image and its mirror (:func:`evaluate`).
    """
    split_dir = resolve_split_dir(data_dir, split)
    classes = check_image_folder(split_dir, verify_images=False)
    model = loaded.model
    if model.num_classes != len(classes):
        raise UserInputError(f'{loaded.name} predicts {model.num_classes} classes but {split_dir} has {len(classes)} '
                             'class folders; pass --num-classes or evaluate on the matching dataset')
    torch_device = torch.device(device)
    model.to(torch_device)
    data_config = loaded.data_config(**(data_args or {}))
    dataset = create_dataset('', root=str(split_dir), split=split, is_training=False)
    loader = create_loader(dataset, input_size=data_config['input_size'], batch_size=batch_size,
                           interpolation=data_config['interpolation'], mean=data_config['mean'],
                           std=data_config['std'], crop_pct=data_config['crop_pct'], num_workers=workers,
                           device=torch_device, use_prefetcher=False)
    amp = partial(torch.autocast, device_type=torch_device.type, dtype=getattr(torch, amp_dtype)) if amp_dtype \
        else nullcontext
    metrics = evaluate(model, loader, device=torch_device, amp_autocast=amp, progress=progress, hflip_tta=hflip_tta)
    return dict(model=loaded.name, split=str(split_dir), images=len(dataset), data_config=data_config,
                hflip_tta=hflip_tta, **metrics)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    loaded = load_model(args.model, args.checkpoint, use_ema=args.use_ema, num_classes=args.num_classes,
                        img_size=args.img_size, in_chans=args.in_chans, input_size=args.input_size,
                        model_kwargs=args.model_kwargs)
    results = run(loaded, args.data_dir, args.split, batch_size=args.batch_size, workers=args.workers,
                  device=args.device, amp_dtype=args.amp_dtype if args.amp else None,
                  data_args={k: getattr(args, k) for k in DATA_ARGS}, progress=not args.no_progress,
                  hflip_tta=args.hflip_tta)
    results['checkpoint'] = args.checkpoint or None
    tta = ', mirror test-time augmentation' if args.hflip_tta else ''
    print(f'{results["model"]} on {results["split"]} ({results["images"]} images{tta}): top1 {results["top1"]:.3f} '
          f'top5 {results["top5"]:.3f} loss {results["loss"]:.4f} ({results["img_per_sec"]:.1f} img/s)')
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as f:
            json.dump({k: v for k, v in results.items() if k != 'data_config'}, f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
