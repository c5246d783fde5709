"""Run a recipe study: one short ``aft-vit train`` run per row, all at the same budget, measured on a held-out
part of the training split (``aft-vit holdout``), never on the test split; then write the table.

A study is a YAML file (``results/cifar10/study.yaml``): the data, the budget in epochs, and rows, each a name, a
recipe (``config``), extra ``aft-vit train`` arguments, optionally the ``base`` row it changes one thing of (the
table gives the difference), ``ema: true`` (its EMA weights are the ones measured) and its own ``epochs`` (a change
that makes training faster is compared at equal wall time: more epochs in the time its base takes). Each row trains
in ``output/<study>/<row>/``; a row that was stopped continues with ``--resume`` (exact), a finished row is not
trained again. Its ``summary.csv``, ``args.yaml`` and wall time are copied to ``results/<study>/<row>/``, and the
table, with the processor it ran on, is written to ``results/<study>/study.md``.

    python results/study.py results/cifar10/study.yaml [--rows NAME ...] [--table-only]
"""
import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import yaml

from aft_vit.machine import machine_description

ROOT = Path(__file__).resolve().parent.parent


def _summary(folder: Path) -> List[Dict[str, float]]:
    path = folder / 'summary.csv'
    if not path.exists():
        return []
    with open(path, newline='', encoding='utf-8') as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def row_epochs(study: Dict[str, Any], row: Dict[str, Any]) -> int:
    """A row's budget: the study's, unless the row has its own."""
    return int(row.get('epochs', study['epochs']))


def row_command(study: Dict[str, Any], row: Dict[str, Any], out: Path) -> List[str]:
    """The ``aft-vit train`` command of a row (with ``--resume`` when a stopped run left a checkpoint)."""
    cmd = ['aft-vit', 'train', '--config', row['config'], '--data-dir', study['data_dir'],
           '--val-split', study['val_split'], '--epochs', str(row_epochs(study, row)), '--output', str(out.parent),
           '--experiment', out.name, '--no-progress', *[str(a) for a in row.get('args', [])]]
    if (out / 'last.pth.tar').exists():
        cmd += ['--resume', str(out / 'last.pth.tar')]
    return cmd


def run_row(study: Dict[str, Any], row: Dict[str, Any], out: Path, record: Path) -> None:
    """Train the row to its budget (or continue it), keeping the wall time of every session in ``wall.json``; then
    copy its files to ``record`` (also those of a row that had finished before)."""
    if len(_summary(out)) < row_epochs(study, row):
        _train(study, row, out)
    record.mkdir(parents=True, exist_ok=True)
    for name in ('summary.csv', 'args.yaml', 'wall.json'):
        shutil.copy(out / name, record / name)


def _train(study: Dict[str, Any], row: Dict[str, Any], out: Path) -> None:
    """One session of a row's training, its wall time and processor appended to ``wall.json``."""
    cmd = row_command(study, row, out)
    wall_path = out / 'wall.json'
    sessions = json.loads(wall_path.read_text()) if wall_path.exists() else []
    start = time.time()
    print(f'== {time.strftime("%H:%M:%S")} {" ".join(cmd)}', flush=True)
    result = subprocess.run(cmd, cwd=ROOT)
    out.mkdir(parents=True, exist_ok=True)
    sessions.append(dict(seconds=round(time.time() - start, 1), command=' '.join(cmd), returncode=result.returncode,
                         machine=machine_description()))
    wall_path.write_text(json.dumps(sessions, indent=2))
    if result.returncode != 0:
        raise SystemExit(f'row {row["name"]} stopped (exit {result.returncode}); run the study again to resume it')


def table(study: Dict[str, Any], rows: List[Dict[str, Any]], results: Path) -> str:
    lines = [f'Budget: {study["epochs"]} epochs per row (where a row has another, its epochs column says so) on '
             f'{study["data_dir"]} (train: the training split less the held-out images), top-1 on its '
             f'`{study["val_split"]}` split, the final epoch, EMA where the row uses it. Written by `python '
             'results/study.py`; each row\'s summary.csv, args.yaml and wall.json (wall time and processor of every '
             'session) are in its folder.', '',
             '| row | what changes | epochs | holdout top-1 | vs base row | train img/s | wall time (min) '
             '| processor |',
             '| --- | --- | --- | --- | --- | --- | --- | --- |']
    tops: Dict[str, float] = {}
    for row in rows:
        summary, epochs = _summary(results / row['name']), row_epochs(study, row)
        if len(summary) < epochs:
            lines.append(f'| {row["name"]} | {row["what"]} | {epochs} | (not run yet: {len(summary)} epochs) '
                         '| | | | |')
            continue
        last = summary[-1]
        top1 = last['eval_ema_top1'] if row.get('ema') else last['eval_top1']
        tops[row['name']] = top1
        change = f'{top1 - tops[row["base"]]:+.2f}' if row.get('base') in tops else ''
        rate = sum(r['train_img_per_sec'] for r in summary) / len(summary)
        sessions = json.loads((results / row['name'] / 'wall.json').read_text())
        minutes = sum(s['seconds'] for s in sessions) / 60
        machines = ', '.join(sorted({s['machine'] for s in sessions}))
        lines.append(f'| {row["name"]} | {row["what"]} | {epochs} | {top1:.2f} | {change} {row.get("base", "")} | '
                     f'{rate:.1f} | {minutes:.1f} | {machines} |')
    return '\n'.join(lines) + '\n'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('study', type=Path)
    parser.add_argument('--rows', nargs='*', default=None, help='run only these rows (default: all, in order)')
    parser.add_argument('--table-only', action='store_true', help='only rewrite the table from results/')
    args = parser.parse_args()
    study = yaml.safe_load(args.study.read_text())
    name = args.study.parent.name
    results = ROOT / 'results' / name / 'study'
    rows = study['rows']
    if not args.table_only:
        for row in rows:
            if args.rows is None or row['name'] in args.rows:
                run_row(study, row, ROOT / 'output' / f'{name}-study' / row['name'], results / row['name'])
    (results.parent / 'study.md').write_text(table(study, rows, results))
    print((results.parent / 'study.md').read_text())
    return 0


if __name__ == '__main__':
    sys.exit(main())
