"""Where a block's time goes, AFT against DeiT of the same size: each part of one block timed on its own.

    python benchmarks/blocks.py [--batches 1 32] [--rounds 60] [--update-readme]

For aft_conv_tiny / deit_tiny_patch16_224 and aft_conv_small, aft_full_small, aft_local_small / deit_small_patch16_224
at 224 px, in inference: the token mixer with its projections (DeiT's timm ``Attention``: qkv,
scaled_dot_product_attention, proj), its two projections alone, the MLP and the whole block, on the tokens the block
sees (AFT-conv's 196 patches; 197 with the class token of DeiT, AFT-full and AFT-local); AFT-conv's projections as its
inference runs them at 224 px, channel-major (``AftConv._forward_channel_major``). 'mixing' is the mixer's time less its
two projections' (a difference of medians): AFT's product against attention itself. Every part of both models runs once
in each round, in turn (DeiT first in every other round), so that each reads its weights after the others have run, as
in a forward; the medians over the rounds. The throughput tables say whether a model is faster; this one says which part
of a block makes the difference.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

from aft_vit.machine import machine_description

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import markdown_table, update_readme  # noqa: E402

PAIRS = (('aft_conv_tiny', 'deit_tiny_patch16_224'), ('aft_conv_small', 'deit_small_patch16_224'),
         ('aft_full_small', 'deit_small_patch16_224'), ('aft_local_small', 'deit_small_patch16_224'))
PARTS = ('qkv', 'proj', 'mixer', 'mlp', 'block')


def _parts(model_name: str, batch: int) -> Dict[str, Callable[[], torch.Tensor]]:
    """The calls that run each part of ``model_name``'s first block on random tokens of the right shape."""
    import timm
    import aft_vit  # noqa: F401  (registers the AFT models)
    model = timm.create_model(model_name).eval()
    block = model.blocks[0]
    grid = model.patch_embed.grid_size
    tokens = torch.randn(batch, grid[0] * grid[1] + model.num_prefix_tokens, model.embed_dim,
                         generator=torch.Generator().manual_seed(0))
    if hasattr(block, 'mixer'):  # AftBlock: the mixer takes the patch grid
        mixer = block.mixer
        run_mixer, run_block = (lambda: mixer(tokens, grid)), (lambda: block(tokens, grid))
    else:
        mixer = block.attn
        run_mixer, run_block = (lambda: mixer(tokens)), (lambda: block(tokens))
    run_qkv, run_proj = (lambda: mixer.qkv(tokens)), (lambda: mixer.proj(tokens))
    with torch.inference_mode():
        channel_major = hasattr(mixer, '_mixes_channel_major') and mixer._mixes_channel_major(tokens, grid)
    if channel_major:  # AFT-conv's projections as its inference runs them: (2 C + h, B T) rows, and back
        rows = torch.randn(model.embed_dim, tokens.shape[0] * tokens.shape[1],
                           generator=torch.Generator().manual_seed(1))
        run_qkv, run_proj = (lambda: mixer._project_in_channel_major(tokens)), (lambda: mixer.proj(rows.t()))
    return {'qkv': run_qkv, 'proj': run_proj, 'mixer': run_mixer, 'mlp': lambda: block.mlp(tokens),
            'block': run_block}


def _rows(aft_name: str, deit_name: str, batch: int, rounds: int) -> List[dict]:
    calls = {name: _parts(name, batch) for name in (aft_name, deit_name)}
    times = {(name, part): [] for name in calls for part in PARTS}
    with torch.inference_mode():
        for name in calls:  # warm-up: caches built, weights touched once
            for call in calls[name].values():
                call(), call()
        for round_index in range(rounds):
            for name in (calls if round_index % 2 == 0 else reversed(list(calls))):  # every other round DeiT first
                for part, call in calls[name].items():
                    start = time.perf_counter()
                    call()
                    times[name, part].append(time.perf_counter() - start)
    medians = {key: statistics.median(values) * 1e6 for key, values in times.items()}
    for name in calls:
        medians[name, 'mixing'] = medians[name, 'mixer'] - medians[name, 'qkv'] - medians[name, 'proj']
    rows = []
    for part in PARTS[:3] + ('mixing',) + PARTS[3:]:
        aft, deit = medians[aft_name, part], medians[deit_name, part]
        rows.append({'pair': f'{aft_name} / {deit_name}', 'batch': batch, 'part': part, 'AFT us': f'{aft:.0f}',
                     'DeiT us': f'{deit:.0f}', 'DeiT / AFT': f'{deit / aft:.2f}' if aft > 0 else ''})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--batches', type=int, nargs='+', default=[1, 32])
    parser.add_argument('--rounds', type=int, default=60)
    parser.add_argument('--update-readme', action='store_true')
    args = parser.parse_args()
    rows = []
    for aft_name, deit_name in PAIRS:
        for batch in args.batches:
            rows += _rows(aft_name, deit_name, batch, args.rounds)
            print(markdown_table(rows[-6:], list(rows[0])), flush=True)
    command = 'python benchmarks/blocks.py' + ('' if args.rounds == 60 else f' --rounds {args.rounds}')
    text = (f'Machine: {machine_description()}. Command: `{command}`. Median microseconds per call of each part '
            f'of the first block over {args.rounds} interleaved rounds, inference, 224 px; \'DeiT / AFT\' above 1: '
            'AFT\'s part faster.\n\n' + markdown_table(rows, list(rows[0])))
    print(text)
    if args.update_readme:
        update_readme(text, 'blocks')


if __name__ == '__main__':
    main()
