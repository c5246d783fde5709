"""Where AFT-conv's dense product stops being faster than its convolution path, on this machine.

    python benchmarks/crossover.py [--update-readme]

For grids of side 12 to 24 patches (T = 144 to 576 tokens), kernel 11, the tiny (32 heads, C = 192) and small
(16 heads, C = 384) layouts at batch 1 and 8, inference with the dense weights prebuilt (as AftConv reuses them),
and a training step (forward and backward, weights rebuilt from the kernel). ``aft_conv2d(method='auto')``
picks dense up to T = 4 s^2 = 484 tokens within a weight budget (``dense_is_cheaper``); the table marks every
cell where that choice is the slower one here. Then, within the convolution path, the two ways of summing the keys
outside each window (prefix sums; products with 0/1 matrices, which it uses while H + W <= 2 s^2) on grids of side
14 to 192, for the tiny layout's 224 stacked channels at batch 1, in inference. Last, the dense product against
the banded one (``aft_vit.layers.band``, which reads (h, W, s W + 1) weights instead of (h, T, T) and copies each
input s times) in inference at batch 1, 2 and 4, both on channel-major inputs as the mixers give them, marking where
``band_is_cheaper`` picks the slower, and the grids past the dense weight cap, where the mixers take the convolution
path and ask neither.
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

from aft_vit.machine import machine_description

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import markdown_table, median_seconds, update_readme  # noqa: E402

SIDES = (12, 14, 16, 20, 22, 24, 28)
KERNEL = 11
LAYOUTS = ((192, 32), (384, 16))  # (C, h): aft_conv_tiny's, aft_conv_small's


def _time(side: int, channels: int, heads: int, batch: int, method: str, train: bool) -> float:
    from aft_vit.layers import aft_conv2d, aft_conv2d_dense, conv_window_weights
    g = torch.Generator().manual_seed(0)
    q, v = (torch.randn(batch, side, side, channels, generator=g) for _ in range(2))
    k, w = torch.randn(batch, side, side, heads, generator=g), torch.randn(heads, KERNEL, KERNEL, generator=g)
    if train:
        for t in (q, k, v, w):
            t.requires_grad_()

        def step():
            aft_conv2d(q, k, v, w, method=method).sum().backward()
        return median_seconds(step, repeats=7, inner=2)
    weights = conv_window_weights(w, side, side)
    with torch.inference_mode():
        if method == 'dense':
            return median_seconds(lambda: aft_conv2d_dense(q, k, v, weights), repeats=7, inner=3)
        return median_seconds(lambda: aft_conv2d(q, k, v, w, method='conv'), repeats=7, inner=3)


OUTSIDE_SIDES = (14, 28, 56, 96, 120, 128, 192)


def _outside_sums_row(channels: int, heads: int) -> dict:
    """Prefix-sum time / product time of the sums outside the window, per grid side ('picked': what the
    convolution path uses there), for the C + h channels the path stacks."""
    from aft_vit.layers.functional import (
        _products_sum_outside, _sum_outside_window_by_prefix_sums, _sum_outside_window_by_products)
    stacked = channels + heads
    row = {'sums outside the window': f'C={channels}, h={heads} ({stacked} stacked channels), batch 1'}
    radius = KERNEL // 2
    for side in OUTSIDE_SIDES:
        x = torch.rand(1, side, side, stacked, generator=torch.Generator().manual_seed(0)).permute(0, 3, 1, 2)
        with torch.inference_mode():
            by_prefix = median_seconds(lambda: _sum_outside_window_by_prefix_sums(x, radius), repeats=7, inner=3)
            by_products = median_seconds(lambda: _sum_outside_window_by_products(x, radius), repeats=7, inner=3)
        picked = 'products' if _products_sum_outside(side, side, radius) else 'prefix sums'
        row[f'side {side}'] = f'{by_prefix / by_products:.2f} ({picked})'
    return row


BAND_SIDES = (10, 12, 14, 16, 20, 22)
BAND_BATCHES = (1, 2, 4)
BLOCKS = 12  # one weight set per block, read in turn as a forward reads them: the dense ones do not stay in cache


def _band_row(channels: int, heads: int, batch: int, rounds: int = 9) -> dict:
    """Dense time / banded time in inference over ``BLOCKS`` blocks' weights, per grid side (rounds interleaved),
    marked where ``band_is_cheaper`` picks the slower of the two, or past the dense weight cap (the mixers take
    the convolution path there: the rule is not asked)."""
    from aft_vit.layers import conv_window_weights, dense_is_cheaper
    from aft_vit.layers.band import aft_conv2d_band, band_is_cheaper, conv_band_weights
    from aft_vit.layers.dense import aft_dense_channel_major
    row = {'layout': f'C={channels}, h={heads}', 'batch': batch}
    for side in BAND_SIDES:
        g = torch.Generator().manual_seed(0)
        kernels = [torch.randn(heads, KERNEL, KERNEL, generator=g) for _ in range(BLOCKS)]
        dense_weights = [conv_window_weights(w, side, side) for w in kernels]
        band_weights = [conv_band_weights(w, side, side) for w in kernels]
        # channel-major, as the mixers give both products in inference
        q, v = (torch.randn(channels, batch, side, side, generator=g) for _ in range(2))
        k = torch.randn(heads, batch, side, side, generator=g)
        rows = (q.view(channels, batch, -1), k.view(heads, batch, -1), v.view(channels, batch, -1))

        def dense():
            for weights in dense_weights:
                aft_dense_channel_major(*rows, weights)

        def band():
            for weights in band_weights:
                aft_conv2d_band(q, k, v, weights)
        times = {dense: [], band: []}
        with torch.inference_mode():
            for i in range(rounds):
                for fn in (dense, band) if i % 2 == 0 else (band, dense):
                    times[fn].append(median_seconds(fn, repeats=1))
        ratio = statistics.median(times[dense]) / statistics.median(times[band])
        if not dense_is_cheaper(side * side, KERNEL, heads):
            mark = ' (weight cap)'
        elif band_is_cheaper(batch, side, side, KERNEL, channels // heads) != (ratio > 1):
            mark = ' (rule slower)'
        else:
            mark = ''
        row[f'T={side * side}'] = f'{ratio:.2f}{mark}'
    return row


def _mark(dense_faster: bool, tokens: int, heads: int) -> str:
    """What the cell says about ``aft_conv2d(method='auto')``'s choice, beyond the ratio."""
    from aft_vit.layers import dense_is_cheaper
    if dense_is_cheaper(tokens, KERNEL, heads) == dense_faster:
        return ''
    if dense_faster and dense_is_cheaper(tokens, KERNEL):
        return ' (conv: weight cap)'  # dense would be faster, but its (h, T, T) weights exceed the memory budget
    return ' (auto slower)'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--update-readme', action='store_true')
    args = parser.parse_args()
    rows = []
    for channels, heads in LAYOUTS:
        for batch, train in ((1, False), (8, False), (8, True)):
            row = {'layout': f'C={channels}, h={heads}', 'batch': batch, 'mode': 'train' if train else 'infer'}
            for side in SIDES:
                dense = _time(side, channels, heads, batch, 'dense', train)
                conv = _time(side, channels, heads, batch, 'conv', train)
                mark = _mark(dense <= conv, side * side, heads)
                row[f'T={side * side}'] = f'{conv / dense:.2f}{mark}'
            rows.append(row)
            print(row, flush=True)
    text = (f'Machine: {machine_description()}. Command: `python benchmarks/crossover.py`. Each cell: conv time / '
            f'dense time (above 1: dense faster); auto picks dense up to T = {4 * KERNEL * KERNEL} tokens if its '
            f'(h, T, T) weights fit in 2^22 values. \'auto slower\': auto picks the slower path; \'weight cap\': '
            f'conv because the dense weights would exceed that memory budget.\n\n'
            + markdown_table(rows, ['layout', 'batch', 'mode'] + [f'T={s * s}' for s in SIDES])
            + '\n\nWithin the convolution path, each cell: prefix-sum time / product time of the sums outside the '
            'window (above 1: products faster), and which of the two the path uses at that grid side.\n\n'
            + markdown_table([_outside_sums_row(*LAYOUTS[0])],
                             ['sums outside the window'] + [f'side {s}' for s in OUTSIDE_SIDES])
            + '\n\nIn inference, each cell: dense product time / banded product time (above 1: banded faster), over '
            f'{BLOCKS} blocks\' weights read in turn; \'rule slower\': `band_is_cheaper` picks the slower of the two; '
            '\'weight cap\': the mixers take the convolution path (the dense weights exceed the budget), and the rule '
            'is not asked.\n\n'
            + markdown_table([_band_row(c, h, b) for c, h in LAYOUTS for b in BAND_BATCHES],
                             ['layout', 'batch'] + [f'T={s * s}' for s in BAND_SIDES]))
    print(text)
    if args.update_readme:
        update_readme(text, 'crossover')


if __name__ == '__main__':
    main()
