"""Draw the training curves of every run under ``results/`` (each a folder with the ``summary.csv`` that
``aft-vit train`` writes).

Runs are grouped by the folder that holds them (``cifar10``, ``cifar10/long``, ``cifar10/matched``,
``cifar10/study``, ...): a group is one comparison, so each gets one figure, ``<group>/training_curves.png``, with
one line per run on shared axes. Rows: training loss, held-out top-1 (runs evaluated every epoch) and learning
rate, so a reader sees that a schedule had one warm-up and one decay. A run evaluated only at the end (its
``eval_<px>.json`` files, written by ``aft-vit eval``) gets a marker at its last epoch for each size it was
evaluated at. A run resumed with a longer schedule (its learning rate goes up again after it had gone down) gets
a dotted line where the new schedule began.

    python results/plot_curves.py            # writes results/<group>/training_curves.png for every group
"""
import argparse
import csv
import json
from pathlib import Path
from typing import Dict, List, Tuple

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

HERE = Path(__file__).resolve().parent
ROWS = (('train_loss', 'training loss'), ('eval_top1', 'top-1 (%)'), ('lr', 'learning rate'))
LEGEND_INCHES_PER_CHAR = 0.06  # a 7 pt label character, with the legend's marker and padding spread over it


def read_summary(path: Path) -> Dict[str, List[float]]:
    """The columns of an ``aft-vit train`` (or timm train.py) summary.csv, as floats."""
    with open(path, newline='', encoding='utf-8') as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f'{path} has no epochs')
    return {key: [float(r[key]) for r in rows] for key in rows[0]}


def schedule_restarts(lr: List[float]) -> List[int]:
    """Epochs (0-based) trained under a restarted schedule: the lr went up after having gone down.

    summary.csv's lr is the one set for the next epoch, so a rise in row i means epoch i already ran the new one.
    """
    restarts, decayed = [], False
    for i in range(1, len(lr)):
        if lr[i] > lr[i - 1] and decayed:
            restarts.append(i)
        decayed = decayed or lr[i] < lr[i - 1]
    return restarts


def final_evaluations(run: Path) -> List[Tuple[int, str, float]]:
    """``(px, split, top1)`` of each of the run's ``eval_<px>.json`` (its last checkpoint evaluated at px), smallest
    px first: a run evaluated at its training size and at a larger one gets a marker for each, labelled."""
    found = []
    for path in run.glob('eval_*.json'):
        px = path.stem.split('_', 1)[1]
        if not px.isdigit():
            raise ValueError(f'{path}: expected eval_<px>.json, as aft-vit eval names it')
        measured = json.loads(path.read_text())
        found.append((int(px), Path(measured['split']).name, measured['top1']))
    return sorted(found)


def find_runs(root: Path) -> Dict[str, Dict[str, Path]]:
    """``{group: {run: folder}}`` for every ``summary.csv`` under ``root``; the group is the run's parent folder."""
    runs: Dict[str, Dict[str, Path]] = {}
    for path in sorted(root.rglob('summary.csv')):
        group = path.parent.parent.relative_to(root).as_posix()
        runs.setdefault(group, {})[path.parent.name] = path.parent
    return runs


def plot_group(title: str, runs: Dict[str, Path], out: Path) -> Path:
    """One figure for the runs of a group: a column, a row per curve, a line (and colour) per run."""
    fig, axes = plt.subplots(len(ROWS), 1, figsize=(6, 2.6 * len(ROWS)), sharex=True, squeeze=False,
                             layout='constrained')
    axes = [row[0] for row in axes]
    top1_axis = axes[[key for key, _ in ROWS].index('eval_top1')]
    restarted = False
    # beyond the default cycle's 10 colours, tab20's 20 keep every run's line distinct
    palette = plt.get_cmap('tab20').colors if len(runs) > 10 else [None] * len(runs)
    for (name, folder), first_color in zip(runs.items(), palette):
        summary = read_summary(folder / 'summary.csv')
        restarts = schedule_restarts(summary.get('lr', []))
        restarted = restarted or bool(restarts)
        epochs = [e + 1 for e in summary['epoch']]
        color = first_color
        for ax, (key, _) in zip(axes, ROWS):
            if key in summary:
                line, = ax.plot(epochs, summary[key], marker='o', markersize=3, label=name, color=color)
                color = line.get_color()
            for epoch in restarts:
                ax.axvline(epoch + 0.5, color=color, linestyle=':', alpha=0.7)
        if 'eval_top1' not in summary:
            for (px, split, top1), marker in zip(final_evaluations(folder), '*Ds^v'):
                top1_axis.plot([epochs[-1]], [top1], marker=marker, markersize=10, linestyle='', color=color,
                               label=f'{name}: {top1:.2f} on {split} at {px} px, last checkpoint')
    for ax, (_, label) in zip(axes, ROWS):
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title(title)
    legend = {}  # one entry per run (and per final evaluation), beside the axes: never over the curves
    for ax in axes:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(list(legend.values()), list(legend), loc='outside right upper', fontsize=7)
    # the legend sits beside the axes: widen the figure by its longest label so the axes keep their 6 inches
    fig.set_size_inches(6 + LEGEND_INCHES_PER_CHAR * max(map(len, legend), default=0), fig.get_figheight())
    if restarted:
        axes[-1].text(0.98, 0.02, 'dotted: resumed with a longer schedule', transform=axes[-1].transAxes,
                      ha='right', va='bottom', fontsize=7, alpha=0.7)
    axes[-1].set_xlabel('epoch')
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches='tight')
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--root', type=Path, default=HERE, help='folder holding the runs (searched recursively)')
    parser.add_argument('--out-dir', type=Path, default=None,
                        help='where <group>/training_curves.png go (default: --root, beside the runs)')
    args = parser.parse_args()
    groups = find_runs(args.root)
    if not groups:
        raise SystemExit(f'no summary.csv found under {args.root}')
    for group, runs in groups.items():
        print(plot_group(group, runs, (args.out_dir or args.root) / group / 'training_curves.png'))


if __name__ == '__main__':
    main()
