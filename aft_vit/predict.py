"""``aft-vit predict``: the top-k labels, with probabilities, of a model for image files.

Label names come from the model's pretrained cfg (``label_names``), the training checkpoint (its
class folders), or ``--class-dir`` (an ImageFolder split whose sorted folder names are the classes).
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from PIL import Image, UnidentifiedImageError

from timm.data import create_transform, resolve_data_config

import aft_vit  # noqa: F401  registers the aft models
from .checkpoint import load_checkpoint_file
from .data import check_image_folder
from .errors import UserInputError
from .evaluate import _FROM_TRAINING
from .factory import create_model_checked, load_weights


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='aft-vit predict', description=__doc__.split('\n\n')[0])
    parser.add_argument('images', nargs='+', help='image files')
    parser.add_argument('--model', default=None, help='registry name[.tag], hf-hub:ORG/NAME or local-dir:PATH')
    parser.add_argument('--checkpoint', default='', help='weights (a training checkpoint or state dict)')
    parser.add_argument('--use-ema', action='store_true')
    parser.add_argument('--class-dir', default='', help='folder whose sub-folders name the classes, in sorted order')
    parser.add_argument('--topk', type=int, default=5)
    parser.add_argument('--num-classes', type=int, default=None)
    parser.add_argument('--json', action='store_true', help='print JSON instead of text')
    return parser


def _label_names(model: torch.nn.Module, checkpoint: Optional[Dict[str, Any]], class_dir: str) -> List[str]:
    if class_dir:
        return check_image_folder(Path(class_dir), verify_images=False)
    if checkpoint and checkpoint.get('label_names'):
        return list(checkpoint['label_names'])
    names = (getattr(model, 'pretrained_cfg', None) or {}).get('label_names')
    return list(names) if names else [str(i) for i in range(model.num_classes)]


def _open_rgb(path: str, channels: int) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert('RGB' if channels == 3 else 'L')
    except FileNotFoundError:
        raise UserInputError(f'image file {path} does not exist') from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserInputError(f'unreadable image file {path}: {e}') from None


def predict(args: argparse.Namespace) -> List[Dict[str, Any]]:
    checkpoint = load_checkpoint_file(args.checkpoint) if args.checkpoint else None
    trained_with = (checkpoint or {}).get('args') or {}
    model_name = args.model or trained_with.get('model')
    if not model_name:
        raise UserInputError('no model: pass --model NAME (or a --checkpoint written by aft-vit train)')
    kwargs = {k: v for k, v in trained_with.items() if k in ('num_classes', 'in_chans') and v is not None}
    kwargs.update(trained_with.get('model_kwargs') or {})
    if trained_with.get('img_size') is not None:
        kwargs.setdefault('img_size', trained_with['img_size'])
    if args.num_classes is not None:
        kwargs['num_classes'] = args.num_classes
    model = create_model_checked(model_name, pretrained=checkpoint is None, **kwargs).eval()
    if checkpoint is not None:
        load_weights(model, args.checkpoint, model_name, use_ema=args.use_ema, checkpoint=checkpoint)
    labels = _label_names(model, checkpoint, args.class_dir)
    if len(labels) != model.num_classes:
        raise UserInputError(f'{len(labels)} label names for a model with {model.num_classes} classes; '
                             'pass --class-dir with the matching class folders')
    data_args = {k: trained_with.get(k) for k in _FROM_TRAINING if k not in ('model', 'model_kwargs')}
    transform = create_transform(**resolve_data_config(data_args, model=model))
    results = []
    with torch.no_grad():
        for path in args.images:
            image = transform(_open_rgb(path, model.in_chans)).unsqueeze(0)
            probs = model(image).softmax(dim=-1)[0]
            top = probs.topk(min(args.topk, probs.numel()))
            results.append(dict(image=path, predictions=[
                dict(label=labels[i], probability=p) for p, i in zip(top.values.tolist(), top.indices.tolist())]))
    return results


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    results = predict(args)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(r['image'] + ': ' + ', '.join(f'{p["label"]} {p["probability"]:.3f}' for p in r['predictions']))
    return 0


if __name__ == '__main__':
    sys.exit(main())
