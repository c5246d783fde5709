"""``aft-vit predict``: the top-k labels, with probabilities, of a model for image files.

Label names come from the model's pretrained cfg (``label_names``), the training checkpoint (its
class folders), or ``--class-dir`` (an ImageFolder split whose sorted folder names are the classes).
Each prediction also gets a readable ``description``: the pretrained cfg's ``label_descriptions``, or
timm's ImageNet metadata for WordNet-id names (Imagenette), else the label itself.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from PIL import Image, UnidentifiedImageError

from timm.data import create_transform

import aft_vit  # noqa: F401  registers the aft models
from .data import check_image_folder
from .errors import UserInputError
from .labels import imagenet_descriptions
from . import evaluate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='aft-vit predict', description=__doc__.split('\n\n')[0])
    parser.add_argument('images', nargs='+', help='image files')
    evaluate.add_model_source_args(parser, 'predict with')
    parser.add_argument('--class-dir', default='', help='folder whose sub-folders name the classes, in sorted order')
    parser.add_argument('--topk', type=int, default=5)
    parser.add_argument('--json', action='store_true', help='print JSON instead of text')
    return parser


def _label_names(model: torch.nn.Module, checkpoint: Optional[Dict[str, Any]], class_dir: str) -> List[str]:
    if class_dir:
        return check_image_folder(Path(class_dir), verify_images=False)
    if checkpoint and checkpoint.get('label_names'):
        return list(checkpoint['label_names'])
    names = (getattr(model, 'pretrained_cfg', None) or {}).get('label_names')
    return list(names) if names else [str(i) for i in range(model.num_classes)]


def _descriptions(model: torch.nn.Module, labels: List[str]) -> Dict[str, str]:
    known = (getattr(model, 'pretrained_cfg', None) or {}).get('label_descriptions') or \
        imagenet_descriptions(labels) or {}
    return {label: known.get(label, label) for label in labels}


def _open_rgb(path: str, channels: int) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert('RGB' if channels == 3 else 'L')
    except FileNotFoundError:
        raise UserInputError(f'image file {path} does not exist') from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserInputError(f'unreadable image file {path}: {e}') from None


def predict(args: argparse.Namespace) -> List[Dict[str, Any]]:
    loaded = evaluate.load_model(args.model, args.checkpoint, use_ema=args.use_ema, num_classes=args.num_classes)
    model = loaded.model.eval()
    labels = _label_names(model, loaded.checkpoint, args.class_dir)
    if len(labels) != model.num_classes:
        raise UserInputError(f'{len(labels)} label names for a model with {model.num_classes} classes; '
                             'pass --class-dir with the matching class folders')
    descriptions = _descriptions(model, labels)
    transform = create_transform(**loaded.data_config())
    results = []
    with torch.no_grad():
        for path in args.images:
            image = transform(_open_rgb(path, model.in_chans)).unsqueeze(0)
            probs = model(image).softmax(dim=-1)[0]
            top = probs.topk(min(args.topk, probs.numel()))
            results.append(dict(image=path, predictions=[
                dict(label=labels[i], description=descriptions[labels[i]], probability=p)
                for p, i in zip(top.values.tolist(), top.indices.tolist())]))
    return results


def _shown(prediction: Dict[str, Any]) -> str:
    label, description = prediction['label'], prediction['description']
    named = label if description == label else f'{label} ({description})'
    return f'{named} {prediction["probability"]:.3f}'


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    results = predict(args)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(r['image'] + ': ' + ', '.join(_shown(p) for p in r['predictions']))
    return 0


if __name__ == '__main__':
    sys.exit(main())
