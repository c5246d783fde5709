"""Inference and training throughput (images/s) and peak memory of AFT models against timm's DeiT of the same size.

    python benchmarks/throughput.py                 # CPU defaults, writes throughput.csv, throughput.png
    python benchmarks/throughput.py --update-readme # and rewrites the table in benchmarks/README.md

Pairs: deit_tiny_patch16_224 / aft_conv_tiny, deit_small_patch16_224 / aft_conv_small, aft_full_small and
aft_local_small (timm's vit_small_patch16_224 is the same network as deit_small_patch16_224).
``--compile`` adds a column pair: the same models, AFT and DeiT alike, under ``torch.compile``, measured in the
same interleaved rounds as eager, and their ratio (peak memory is measured eager only).
Throughput: one process, every model of a resolution built first; then each (mode, batch) group warmed up and
measured in interleaved rounds over its models, every other round in reverse order (so drifts of the machine, and
the state one step leaves to the next, hit all models alike); the median of the rounds is reported. Peak memory: a
fresh process per configuration, its RSS high-water mark above its state right before the first step, with glibc
serving every allocation of 64 KiB or more by mmap so that the mark follows live tensors (CPU; see
``_measure.run_isolated``), or torch's allocator peak (GPU). Ratios are AFT / DeiT at the same resolution, batch and
mode. Page faults: the median of the minor page faults a timed step took (console and CSV only).
"""
import argparse
import csv
import json
import resource
import statistics
import sys
from pathlib import Path
from typing import Dict, List

import torch

from aft_vit.machine import machine_description

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import (  # noqa: E402
    markdown_table, median_seconds, peak_rss_mib, reset_peak_rss, rss_mib, run_isolated,
    update_readme)

PAIRS = {'aft_conv_tiny': 'deit_tiny_patch16_224', 'aft_conv_small': 'deit_small_patch16_224',
         'aft_full_small': 'deit_small_patch16_224', 'aft_local_small': 'deit_small_patch16_224'}
CPU_BATCHES = {224: [1, 32], 384: [1, 8], 512: [1, 4], 896: [1, 2]}
GPU_BATCHES = {224: [256], 384: [64], 512: [32], 896: [8]}


def _build(name: str, res: int, device: torch.device, compile_model: bool):
    import timm
    import aft_vit  # noqa: F401
    model = timm.create_model(name, img_size=res).to(device)
    return torch.compile(model) if compile_model else model


def _step_fn(model, mode: str, batch: int, res: int, device: torch.device, amp: bool):
    x = torch.randn(batch, 3, res, res, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    if mode == 'infer':
        model.eval()

        def step():
            with torch.inference_mode(), autocast:
                model(x)
        return step
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    target = torch.randint(0, 1000, (batch,), device=device)

    def step():
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def minor_page_faults() -> int:
    """Page faults this process has taken that needed no disk: each maps a fresh (zeroed) page, as glibc's large
    allocations and regrown heap tops do, and costs time that the step's own work does not show."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def child(spec: dict) -> dict:
    """Peak memory of one configuration, in this fresh process."""
    device = torch.device(spec['device'])
    model = _build(spec['model'], spec['res'], device, spec['compile'])
    step = _step_fn(model, spec['mode'], spec['batch'], spec['res'], device, spec['amp'])
    if device.type == 'cuda':
        step()
        _sync(device)  # compile / warm-up outside the measured peak
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        _sync(device)
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    else:
        reset_peak_rss()
        base = rss_mib()
        step()
        step()
        peak = peak_rss_mib() - base
    return dict(peak_mib=peak)


def measure_throughput(models: List[str], res: int, batches: List[int], modes: List[str], device, rounds: int,
                       compiled: bool, amp: bool) -> List[Dict]:
    """Median images/s of every (model, batch, mode), eager and (with ``compiled``) under torch.compile.

    Each (mode, batch) group is warmed up and measured on its own, its models in interleaved rounds, every other
    round in reverse order: no model always runs right after the same other one (the allocator's and the caches'
    state it inherits, a drift within a round). Groups are not mixed within a round, as no training or serving
    process mixes batch sizes: rounds that did (batch-1 steps between batch-32 ones) measured aft_full_small's
    training at 0.79x and 0.83x deit_small's in two runs, where rounds of the batch-32 rows alone gave 1.05x the
    same day (an AMD EPYC).
    """
    variants = [False, True] if compiled else [False]
    # one model per mode: a training step must not change the weights (or the train / eval mode) that the
    # inference steps measure, or AFT-conv would rebuild its kernel-derived weights after every optimizer step
    built = {(m, c, mode): _build(m, res, device, c) for m in models for c in variants for mode in modes}
    times, faults = {}, {}
    for mode in modes:
        for b in batches:
            group = [(m, b, mode, c) for c in variants for m in models]
            steps = {cfg: _step_fn(built[(cfg[0], cfg[3], mode)], mode, b, res, device, amp) for cfg in group}
            for cfg in group:  # warm-up (and compilation)
                steps[cfg]()
                steps[cfg]()
            _sync(device)
            for round_index in range(rounds):
                for cfg in group if round_index % 2 == 0 else group[::-1]:
                    def timed():
                        steps[cfg]()
                        _sync(device)
                    inner = 2 if b <= 8 else 1
                    before = minor_page_faults()
                    times.setdefault(cfg, []).append(median_seconds(timed, repeats=1, inner=inner))
                    faults.setdefault(cfg, []).append((minor_page_faults() - before) / inner)
    rows = {}
    for (m, b, mode, c), ts in times.items():
        row = rows.setdefault((m, b, mode), dict(model=m, res=res, batch=b, mode=mode))
        row['compiled_img_s' if c else 'img_s'] = b / sorted(ts)[len(ts) // 2]
        if not c:
            row['faults'] = statistics.median(faults[(m, b, mode, c)])
    return list(rows.values())


def _ratio_rows(rows: List[Dict]) -> List[Dict]:
    index = {(r['model'], r['res'], r['batch'], r['mode']): r for r in rows}
    out = []
    for r in rows:
        if r['model'] not in PAIRS:
            continue
        base = index[(PAIRS[r['model']], r['res'], r['batch'], r['mode'])]
        row = {
            'model': r['model'], 'vs': base['model'], 'res': r['res'], 'batch': r['batch'], 'mode': r['mode'],
            'img/s': f'{r["img_s"]:.1f}', 'DeiT img/s': f'{base["img_s"]:.1f}',
            'speed ratio': f'{r["img_s"] / base["img_s"]:.2f}',
            'peak MiB': f'{r["peak_mib"]:.0f}', 'DeiT peak MiB': f'{base["peak_mib"]:.0f}',
            'memory ratio': f'{r["peak_mib"] / max(base["peak_mib"], 1e-9):.2f}',
        }
        if 'compiled_img_s' in r:
            row.update({'compiled img/s': f'{r["compiled_img_s"]:.1f}',
                        'DeiT compiled img/s': f'{base["compiled_img_s"]:.1f}',
                        'compiled ratio': f'{r["compiled_img_s"] / base["compiled_img_s"]:.2f}'})
        out.append(row)
    return out


def plot(rows: List[Dict], path: Path, machine: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for col, mode in enumerate(('infer', 'train')):
        sub = [r for r in rows if r['mode'] == mode]
        if not sub:
            continue
        batch = {res: max(r['batch'] for r in sub if r['res'] == res) for res in {r['res'] for r in sub}}
        for model in sorted({r['model'] for r in sub}):
            pts = sorted((r['res'], r['img_s'], r['peak_mib']) for r in sub
                         if r['model'] == model and r['batch'] == batch[r['res']])
            if not pts:
                continue
            style = '--' if model.startswith(('deit', 'vit')) else '-'
            axes[0][col].plot([p[0] for p in pts], [p[1] for p in pts], style, marker='o', label=model)
            axes[1][col].plot([p[0] for p in pts], [p[2] for p in pts], style, marker='o', label=model)
        axes[0][col].set(title=f'{mode}: images/s (largest batch per size)', xlabel='resolution (px)', yscale='log')
        axes[1][col].set(title=f'{mode}: peak memory (MiB)', xlabel='resolution (px)', yscale='log')
        axes[0][col].legend(fontsize=8)
    fig.suptitle(machine, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--resolutions', type=int, nargs='+', default=[224, 384, 512, 896])
    parser.add_argument('--models', nargs='+', default=['deit_tiny_patch16_224', 'aft_conv_tiny', 'deit_small_patch16_224',
                                                        'aft_conv_small', 'aft_full_small', 'aft_local_small'])
    parser.add_argument('--train-resolutions', type=int, nargs='+', default=[224])
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--compile', action='store_true',
                        help='also measure every model under torch.compile (a column pair beside eager)')
    parser.add_argument('--amp', action='store_true', help='bfloat16 autocast')
    parser.add_argument('--out', default=str(Path(__file__).with_name('throughput')), help='CSV / PNG path stem')
    parser.add_argument('--update-readme', action='store_true')
    parser.add_argument('--child', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    device = torch.device(args.device)
    batches = GPU_BATCHES if device.type == 'cuda' else CPU_BATCHES
    machine = machine_description()
    rows = []
    for res in args.resolutions:
        modes = ['infer'] + (['train'] if res in args.train_resolutions else [])
        res_rows = measure_throughput(args.models, res, batches[res], modes, device, args.rounds, args.compile, args.amp)
        for r in res_rows:
            r['peak_mib'] = run_isolated(Path(__file__), dict(model=r['model'], res=res, batch=r['batch'],
                                                              mode=r['mode'], device=args.device,
                                                              compile=False, amp=args.amp),
                                       measures_memory=True)['peak_mib']
            compiled = f' {r["compiled_img_s"]:9.1f} img/s compiled' if 'compiled_img_s' in r else ''
            print(f'{r["model"]:<24} {res:>4}px b{r["batch"]:<4} {r["mode"]:<5} {r["img_s"]:9.1f} img/s '
                  f'{r["peak_mib"]:9.1f} MiB {r["faults"]:9.0f} page faults/step{compiled}', flush=True)
        rows += res_rows
    out = Path(args.out)
    with open(out.with_suffix('.csv'), 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=['model', 'res', 'batch', 'mode', 'img_s', 'compiled_img_s', 'peak_mib',
                                                  'faults'])
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out.with_suffix('.png'), machine)
    columns = ['model', 'vs', 'res', 'batch', 'mode', 'img/s', 'DeiT img/s', 'speed ratio']
    if args.compile:
        columns += ['compiled img/s', 'DeiT compiled img/s', 'compiled ratio']
    table = markdown_table(_ratio_rows(rows), columns + ['peak MiB', 'DeiT peak MiB', 'memory ratio'])
    print(f'\nMachine: {machine}\n\n{table}')
    if args.update_readme:
        section = ('gpu' if device.type == 'cuda' else 'cpu') + ('-compile' if args.compile else '')
        command = 'python ' + ' '.join(['benchmarks/throughput.py'] + sys.argv[1:])
        update_readme(f'Machine: {machine}. Command: `{command}`.\n\n{table}', f'throughput-{section}')


if __name__ == '__main__':
    main()
