"""The ``aft-vit`` command: ``models``, ``train``, ``eval``, ``predict``, ``publish``, ``convert``, ``export``.

Each subcommand parses its own arguments (``aft-vit train --help``). Problems with what the user
passed (missing data, unknown model, a checkpoint of another model) end in one line on stderr
and exit status 2, never a traceback.
"""
import argparse
import sys
from typing import List, Optional

import timm

import aft_vit  # noqa: F401  registers the models
from .errors import UserInputError


def _describe(name: str) -> dict:
    """Build the model on the meta device (no memory, no init cost) and read its size off it."""
    model = timm.create_model(name, device='meta')
    cfg = timm.get_pretrained_cfg(name)
    return dict(
        name=name,
        mixer=model.blocks[0].mixer.describe(),
        dim_depth=f'{model.embed_dim} / {len(model.blocks)}',
        params=sum(p.numel() for p in model.parameters()) / 1e6,
        input=(f'any multiple of {model.patch_embed.patch_size[0]}' if not cfg.fixed_input_size
               else 'x'.join(map(str, cfg.input_size[1:]))),
        weights=', '.join(timm.list_pretrained(f'{name}.*')) or 'none yet',
    )


def cmd_models(args: argparse.Namespace) -> int:
    rows = [_describe(name) for name in timm.list_models(args.filter, module='aft_vision_transformer')]
    if not rows:
        print(f'no AFT model matches {args.filter!r}; try `aft-vit models` for the full list', file=sys.stderr)
        return 2
    header = f'{"model":<26} {"mixer":<36} {"dim / depth":<12} {"params":>8}  {"input":<20} weights'
    print(header)
    print('-' * len(header))
    for r in rows:
        print(f'{r["name"]:<26} {r["mixer"]:<36} {r["dim_depth"]:<12} {r["params"]:>7.2f}M  {r["input"]:<20} {r["weights"]}')
    return 0


def _models_main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog='aft-vit models', description='list the AFT models registered in timm')
    parser.add_argument('filter', nargs='?', default='aft_*', help='wildcard filter on model names (default aft_*)')
    return cmd_models(parser.parse_args(argv))


def _subcommands():
    from . import convert, evaluate, export, holdout, hub, predict, train
    return {
        'models': (_models_main, 'list the AFT models registered in timm, with their parameter counts'),
        'train': (train.main, 'train or fine-tune a model on an ImageFolder tree (timm train.py arguments)'),
        'eval': (evaluate.main, 'top-1 / top-5 / loss / img/s of a model on an ImageFolder split'),
        'predict': (predict.main, 'top-k labels of a model for image files'),
        'publish': (hub.main, 'write a Hub model folder (config.json, model.safetensors, card) from a checkpoint'),
        'convert': (convert.main, 'initialize an AFT model from a timm ViT / DeiT checkpoint'),
        'holdout': (holdout.main, 'hold out part of a train split (as links) to choose recipes without the test split'),
        'export': (export.main, 'write an ONNX file of a model, checked in onnxruntime against PyTorch'),
    }


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = _subcommands()
    if not argv or argv[0] in ('-h', '--help') or argv[0] not in commands:
        print('usage: aft-vit {' + ','.join(commands) + '} [ARGS...]\n')
        for name, (_, text) in commands.items():
            print(f'  {name:<8} {text}')
        if argv and argv[0] not in ('-h', '--help'):
            print(f'\naft-vit: error: unknown command {argv[0]!r}', file=sys.stderr)
            return 2
        return 0 if argv else 2
    command, _ = commands[argv[0]]
    try:
        return command(argv[1:])
    except UserInputError as e:
        print(f'aft-vit {argv[0]}: error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f'aft-vit {argv[0]}: interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
