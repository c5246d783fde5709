"""Draw the training curves of the runs under ``results/<dataset>/<model>/summary.csv`` (written by ``aft-vit train``).

One column per dataset, rows for training loss and held-out top-1, one line per model, so AFT and DeiT trained
with the same recipe sit on the same axes. A run resumed with a longer schedule (its learning rate goes up again
after it had gone down) gets a dotted line where the new schedule began.

    python results/plot_curves.py            # writes results/training_curves.png
"""
import argparse
import csv
from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
ROWS = (('train_loss', 'training loss'), ('eval_top1', 'held-out top-1 (%)'))


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


def find_runs(root: Path) -> Dict[str, Dict[str, Path]]:
    """``{dataset: {model: summary.csv}}`` for every ``root/<dataset>/<model>/summary.csv``."""
    runs: Dict[str, Dict[str, Path]] = {}
    for path in sorted(root.glob('*/*/summary.csv')):
        runs.setdefault(path.parent.parent.name, {})[path.parent.name] = path
    return runs


def plot(runs: Dict[str, Dict[str, Path]], out: Path) -> Path:
    if not runs:
        raise SystemExit('no results/<dataset>/<model>/summary.csv found')
    fig, axes = plt.subplots(len(ROWS), len(runs), figsize=(4.5 * len(runs), 6.5), squeeze=False)
    for col, (dataset, models) in enumerate(runs.items()):
        restarted = False
        for model, path in models.items():
            summary = read_summary(path)
            restarts = schedule_restarts(summary.get('lr', []))
            restarted = restarted or bool(restarts)
            epochs = [e + 1 for e in summary['epoch']]
            for row, (key, label) in enumerate(ROWS):
                ax = axes[row][col]
                line, = ax.plot(epochs, summary[key], marker='o', label=model)
                for epoch in restarts:
                    ax.axvline(epoch + 0.5, color=line.get_color(), linestyle=':', alpha=0.7)
                ax.set_ylabel(label)
                ax.grid(alpha=0.3)
        axes[0][col].set_title(dataset)
        if restarted:
            axes[-1][col].text(0.98, 0.02, 'dotted: resumed with a longer schedule', transform=axes[-1][col].transAxes,
                               ha='right', va='bottom', fontsize=7, alpha=0.7)
        axes[-1][col].set_xlabel('epoch')
        axes[0][col].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--root', type=Path, default=HERE, help='folder holding <dataset>/<model>/summary.csv')
    parser.add_argument('--out', type=Path, default=HERE / 'training_curves.png')
    args = parser.parse_args()
    print(plot(find_runs(args.root), args.out))


if __name__ == '__main__':
    main()
