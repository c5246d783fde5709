"""``aft-vit convert``: initialize an AFT model from a timm ViT / DeiT checkpoint of the same width and depth.

The paper's best model (Table 8) starts AFT-conv base from DeiT-base this way: every tensor is copied except
the position embedding, the class token and the query and key projections (AFT's key has one channel per
head for AFT-conv, and AFT's queries gate with a sigmoid rather than score keys). timm's fused ``qkv`` is
split: its value rows go into the AFT model's fused ``qkv`` (ordered q, k, v); q and k rows stay at init.
"""
import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

import aft_vit  # noqa: F401  registers the aft models
from .checkpoint import load_checkpoint_file, save_atomic, select_state_dict
from .errors import UserInputError
from .factory import create_model_checked

NEVER_COPIED = ('pos_embed', 'cls_token', 'reg_token', 'dist_token')


def _source_shape(state_dict: Dict[str, torch.Tensor]) -> Tuple[int, int]:
    """(width, depth) of a timm ViT state dict."""
    if 'blocks.0.attn.qkv.weight' not in state_dict or 'patch_embed.proj.weight' not in state_dict:
        raise UserInputError('the source is not a timm ViT / DeiT checkpoint (no patch_embed.proj / blocks.0.attn.qkv)')
    depth = 1 + max(int(k.split('.')[1]) for k in state_dict if k.startswith('blocks.'))
    return state_dict['patch_embed.proj.weight'].shape[0], depth


def convert_vit_to_aft(
        source: Dict[str, torch.Tensor],
        model: torch.nn.Module,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, List[str]]]:
    """The AFT model's state dict with the ViT's tensors copied in, and a report: copied / split / left at init."""
    width, depth = _source_shape(source)
    if (width, depth) != (model.embed_dim, len(model.blocks)):
        raise UserInputError(f'the source ViT is {width} wide and {depth} deep, {model.pretrained_cfg["architecture"]} '
                             f'is {model.embed_dim} wide and {len(model.blocks)} deep; convert into the AFT model of '
                             'the same width and depth (aft_*_tiny: 192, aft_*_small: 384, aft_conv_base_k25: 768)')
    target = {k: v.clone() for k, v in model.state_dict().items()}
    report = {'copied': [], 'split': [], 'init': []}
    used = set()
    for i in range(depth):
        for kind in ('weight', 'bias'):
            key = f'blocks.{i}.attn.qkv.{kind}'
            if key not in source:
                continue
            values = source[key][2 * width:3 * width]  # timm's qkv rows are [q; k; v]
            dest = target[f'blocks.{i}.mixer.qkv.{kind}']
            dest[-width:] = values  # AFT's fused qkv ends with its v rows
            report['split'].append(f'{key} -> blocks.{i}.mixer.qkv.{kind}[v rows]')
            used.add(key)
    for key, value in source.items():
        if key in used or key in NEVER_COPIED:
            continue
        dest_key = key.replace('.attn.proj.', '.mixer.proj.')
        if dest_key in target and target[dest_key].shape == value.shape:
            target[dest_key] = value.clone()
            report['copied'].append(key if dest_key == key else f'{key} -> {dest_key}')
            used.add(key)
    copied_dest = {r.split(' -> ')[-1].split('[')[0] for r in report['copied'] + report['split']}
    report['init'] = [k for k in target if k not in copied_dest]
    report['init'] += [f'blocks.{i}.mixer.qkv.{kind}[q, k rows]' for i in range(depth) for kind in ('weight', 'bias')
                       if f'blocks.{i}.attn.qkv.{kind}' in used]
    report['skipped'] = [k for k in source if k not in used]
    return target, report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='aft-vit convert', description=__doc__.split('\n\n')[0])
    parser.add_argument('--source', required=True, help='timm ViT / DeiT checkpoint file (state dict or training checkpoint)')
    parser.add_argument('--model', required=True, help='AFT model to initialize, e.g. aft_conv_base_k25')
    parser.add_argument('--output', required=True, help='checkpoint to write (use with aft-vit train --initial-checkpoint)')
    parser.add_argument('--num-classes', type=int, default=None, help='classifier size (copied only if it matches)')
    parser.add_argument('--img-size', type=int, default=None)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    checkpoint = load_checkpoint_file(args.source)
    source = select_state_dict(checkpoint, use_ema=True)  # a new artifact: EMA weights when there are any
    kwargs = {k: v for k, v in dict(num_classes=args.num_classes, img_size=args.img_size).items() if v is not None}
    model = create_model_checked(args.model, **kwargs)
    state_dict, report = convert_vit_to_aft(source, model)
    model.load_state_dict(state_dict)
    save_atomic(dict(arch=args.model, state_dict=model.state_dict(), converted_from=str(Path(args.source).name)),
                Path(args.output))
    for what, title in (('copied', 'copied'), ('split', 'split from the fused qkv (value rows)'),
                        ('init', 'left at init'), ('skipped', 'not used from the source')):
        print(f'{title} ({len(report[what])}):')
        for line in report[what]:
            print(f'  {line}')
    print(f'wrote {args.output}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
