"""Time and peak memory of each AFT operator against scaled_dot_product_attention, for T from 256 to 16,384 tokens.

    python benchmarks/operators.py [--tokens 256 1024 4096 16384] [--csv benchmarks/operators.csv]

Every (operator, T) runs in two fresh processes: one for its peak RSS (that process's high-water mark above its
state just before one call), one for its time. Inputs: batch 1, C = 384 channels (AFT-conv: 16 heads, kernel 11, on
a square grid; attention: 6 heads of 64). Time is the median of repeated calls after a warm-up. The summary prints
how time grows from the smallest to the largest T: linear growth is T_max / T_min, quadratic its square.
"""
import argparse
import csv
import json
import math
import sys
from pathlib import Path

import torch

from aft_vit.machine import machine_description
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import (  # noqa: E402
    markdown_table, median_seconds, peak_rss_mib, reset_peak_rss, rss_mib, run_isolated,
    update_readme)

OPERATORS = ('aft_simple', 'aft_conv2d', 'aft_local', 'aft_full', 'sdpa')
CHANNELS, CONV_HEADS, KERNEL, ATTN_HEADS, LOCAL_WINDOW = 384, 16, 11, 6, 64


def _call(op: str, tokens: int):
    from aft_vit.layers import aft_conv2d, aft_full, aft_local, aft_simple
    g = torch.Generator().manual_seed(0)
    x = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if op == 'aft_conv2d':
        side = int(math.isqrt(tokens))
        q, v, k, w = x(1, side, side, CHANNELS), x(1, side, side, CHANNELS), x(1, side, side, CONV_HEADS), x(CONV_HEADS, KERNEL, KERNEL)
        return lambda: aft_conv2d(q, k, v, w)
    q, k, v = x(1, tokens, CHANNELS), x(1, tokens, CHANNELS), x(1, tokens, CHANNELS)
    if op == 'aft_simple':
        return lambda: aft_simple(q, k, v)
    if op == 'aft_full':
        w = x(tokens, tokens)
        return lambda: aft_full(q, k, v, w)
    if op == 'aft_local':
        w = x(tokens, tokens)
        return lambda: aft_local(q, k, v, w, LOCAL_WINDOW)
    qh, kh, vh = (t.view(1, tokens, ATTN_HEADS, -1).transpose(1, 2) for t in (q, k, v))
    return lambda: F.scaled_dot_product_attention(qh, kh, vh)


def child(spec: dict) -> dict:
    """The peak memory of one call (``spec['measure'] == 'memory'``) or the median time of calls after a warm-up."""
    torch.set_grad_enabled(False)
    fn = _call(spec['op'], spec['tokens'])
    if spec['measure'] == 'memory':
        reset_peak_rss()
        before = rss_mib()
        fn()
        return dict(peak_mib=max(peak_rss_mib() - before, 0.))
    fn()
    repeats = 5 if spec['tokens'] <= 4096 else 2
    return dict(ms=median_seconds(fn, repeats=repeats, inner=1) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--tokens', type=int, nargs='+', default=[256, 1024, 4096, 16384])
    parser.add_argument('--ops', nargs='+', default=list(OPERATORS))
    parser.add_argument('--csv', default=str(Path(__file__).with_name('operators.csv')))
    parser.add_argument('--update-readme', action='store_true', help='rewrite the table in benchmarks/README.md')
    parser.add_argument('--from-csv', action='store_true', help='only re-print / re-write the table of the CSV')
    parser.add_argument('--child', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    rows = []
    if args.from_csv:
        with open(args.csv) as f:
            rows = [dict(op=r['op'], tokens=int(r['tokens']), ms=float(r['ms']), peak_mib=float(r['peak_mib']))
                    for r in csv.DictReader(f)]
        args.tokens = sorted({r['tokens'] for r in rows})
        args.ops = list(dict.fromkeys(r['op'] for r in rows))
    for tokens in ([] if args.from_csv else args.tokens):
        for op in args.ops:
            row = dict(op=op, tokens=tokens)
            for measure in ('memory', 'time'):
                spec = dict(row, measure=measure)
                row.update(run_isolated(Path(__file__), spec, measures_memory=measure == 'memory'))
            rows.append(row)
            print(f'{op:<11} T={tokens:<6} {row["ms"]:10.2f} ms  peak +{row["peak_mib"]:8.1f} MiB', flush=True)
    if not args.from_csv:
        with open(args.csv, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=['op', 'tokens', 'ms', 'peak_mib'])
            writer.writeheader()
            writer.writerows(rows)
    hi = max(args.tokens)
    prev = max([t for t in args.tokens if t < hi], default=hi)  # growth over the last step, past small-T overheads
    table = []
    for op in args.ops:
        r = {row['tokens']: row for row in rows if row['op'] == op}
        entry = {'operator': op}
        for t in args.tokens:
            entry[f'T={t} ms'] = f'{r[t]["ms"]:.2f}'
            entry[f'T={t} MiB'] = f'{r[t]["peak_mib"]:.0f}'
        entry[f'time x (T {prev}->{hi})'] = f'{r[hi]["ms"] / r[prev]["ms"]:.1f}'
        table.append(entry)
    columns = ['operator'] + [c for t in args.tokens for c in (f'T={t} ms', f'T={t} MiB')] + [f'time x (T {prev}->{hi})']
    text = (f'Machine: {machine_description()}. Command: `python benchmarks/operators.py`. From T={prev} to T={hi} '
            f'linear growth is x{hi // prev}, quadratic x{(hi // prev) ** 2}.\n\n' + markdown_table(table, columns))
    print('\n' + text)
    if args.update_readme:
        update_readme(text, 'operators')


if __name__ == '__main__':
    main()
