"""``aft-vit holdout``: hold out part of an ImageFolder train split, to choose recipes without the test split.

Writes ``OUTPUT/train/<class>/`` and ``OUTPUT/holdout/<class>/`` as symbolic links to the original images (no
copies): ``--per-class`` images of each class, drawn with a seeded shuffle of the sorted file names, go to
``holdout``, the rest to ``train``. Train on it with ``--data-dir OUTPUT --val-split holdout``. The same
arguments give the same split on any machine. The tree is assembled in a temporary folder and moved into place
at the end.
"""
import argparse
import os
import random
import sys
from pathlib import Path
from typing import Dict, List, Optional

from .checkpoint import atomic_folder
from .data import check_image_folder, image_files, resolve_split_dir
from .errors import UserInputError


def split_class(files: List[Path], per_class: int, seed: int) -> Dict[str, List[Path]]:
    """A seeded draw of ``per_class`` files for holdout; the order of ``files`` does not matter."""
    ordered = sorted(files)
    random.Random(seed).shuffle(ordered)
    return {'holdout': sorted(ordered[:per_class]), 'train': sorted(ordered[per_class:])}


def make_holdout(data_dir: str, output: str, per_class: int, seed: int = 0, train_split: str = 'train',
                 force: bool = False) -> Dict[str, int]:
    """Write the linked train / holdout tree; returns the image count of each split."""
    train_dir = resolve_split_dir(data_dir, train_split).resolve()
    classes = check_image_folder(train_dir, verify_images=False)
    out = Path(output)
    if out.exists() and not force:
        raise UserInputError(f'{out} already exists; pass --force to replace it')
    counts = {'train': 0, 'holdout': 0}
    with atomic_folder(out) as tmp:
        for name in classes:
            files = image_files(train_dir / name)
            if len(files) <= per_class:
                raise UserInputError(f'class {name} has {len(files)} images, not more than --per-class {per_class}')
            for split, chosen in split_class(files, per_class, seed).items():
                (tmp / split / name).mkdir(parents=True)
                for file in chosen:
                    link = tmp / split / name / file.relative_to(train_dir / name)
                    link.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(file.resolve(), link)
                counts[split] += len(chosen)
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='aft-vit holdout', description=__doc__.split('\n\n')[0])
    parser.add_argument('--data-dir', required=True, help='ImageFolder root holding the train split')
    parser.add_argument('--output', required=True, help='folder to write (train/ and holdout/, as links)')
    parser.add_argument('--per-class', type=int, required=True, help='images of each class to hold out')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--train-split', default='train')
    parser.add_argument('--force', action='store_true', help='replace an existing output folder')
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    counts = make_holdout(args.data_dir, args.output, args.per_class, args.seed, args.train_split, args.force)
    print(f'{args.output}: train {counts["train"]} images, holdout {counts["holdout"]} images (seed {args.seed})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
