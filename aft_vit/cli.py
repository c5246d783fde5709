"""The ``aft-vit`` command. ``aft-vit models`` lists the registered AFT models with their measured sizes."""
import argparse
import sys
from typing import List, Optional

import timm

import aft_vit  # noqa: F401  registers the models


def _describe(name: str) -> dict:
    """Build the model on the meta device (no memory, no init cost) and read its size off it."""
    model = timm.create_model(name, device='meta')
    cfg = timm.get_pretrained_cfg(name)
    mixer = model.mixer_type
    detail = {
        'conv': lambda m: f'{m.num_heads} heads, kernel {m.kernel_size}',
        'full': lambda m: f'bias rank {m.pos_bias_u.shape[1]}',
        'local': lambda m: f'bias rank {m.pos_bias_u.shape[1]}, window {m.window}',
        'simple': lambda m: 'no position bias',
    }[mixer](model.blocks[0].mixer)
    return dict(
        name=name,
        mixer=f'AFT-{mixer} ({detail})',
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='aft-vit', description='Attention Free Transformer vision models for timm.')
    sub = parser.add_subparsers(dest='command', required=True)
    models = sub.add_parser('models', help='list the AFT models registered in timm, with their parameter counts')
    models.add_argument('filter', nargs='?', default='aft_*', help='wildcard filter on model names (default aft_*)')
    models.set_defaults(func=cmd_models)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
