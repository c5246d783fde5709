"""ImageFolder datasets for the command line: find the split folder and check it before training starts.

timm's readers quietly drop empty class folders (which changes the class count), skip
images whose extension is not in ``timm.data.get_img_extensions()`` and skip unreadable
images with a warning; a training run should instead stop at once and name the folder or
file. The check reads exactly what timm's reader reads.
"""
import argparse
import os
from pathlib import Path
from typing import Any, Dict, List

from PIL import Image, UnidentifiedImageError
from timm.data import get_img_extensions

from .errors import UserInputError

# Image files that PIL opens but timm's ImageFolder reader would silently leave out (unless a caller adds them
# with timm.data.add_img_extensions): named as an error rather than dropped from the data set.
PIL_IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp')
TRAIN_SPLITS = ('train', 'training')
EVAL_SPLITS = ('validation', 'val', 'valid', 'eval', 'evaluation', 'test')


def resolve_split_dir(data_dir: str, split: str) -> Path:
    """The folder of ``split`` under ``data_dir``: the exact name, else a synonym ('val' / 'test' for 'validation')."""
    root = Path(data_dir)
    if not root.is_dir():
        raise UserInputError(f'data dir {data_dir} does not exist or is not a folder; point --data-dir at a folder '
                             'holding train/ and val/ (or test/) ImageFolder trees')
    candidates = [split]
    if split in TRAIN_SPLITS:
        candidates += list(TRAIN_SPLITS)
    elif split in EVAL_SPLITS:
        candidates += list(EVAL_SPLITS)
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    present = sorted(p.name for p in root.iterdir() if p.is_dir())
    raise UserInputError(f'no {split!r} split in {data_dir} (looked for {", ".join(dict.fromkeys(candidates))}; '
                         f'found {", ".join(present) or "no folders"})')


def _is_image(name: str) -> bool:
    """An image timm's ImageFolder reader will read (its extension list, at the time of the call)."""
    return name.lower().endswith(get_img_extensions())


def _is_skipped_image(name: str) -> bool:
    return not _is_image(name) and name.lower().endswith(PIL_IMAGE_EXTENSIONS)


def _files(folder: Path) -> List[Path]:
    return [Path(root, f) for root, _, names in os.walk(folder) for f in names]


def image_files(class_dir: Path) -> List[Path]:
    """The images timm's ImageFolder reader reads under a class folder (sub-folders included)."""
    return [f for f in _files(class_dir) if _is_image(f.name)]


def check_image_folder(split_dir: Path, verify_images: bool = True) -> List[str]:
    """Check an ImageFolder tree (``<split>/<class>/<image>``) and return its class names in index order.

    With ``verify_images`` every file's header is read (fast: no decoding), so a corrupt or
    mislabelled file is named here rather than skipped mid-training.
    """
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        loose = [p.name for p in split_dir.iterdir() if p.is_file() and _is_image(p.name)]
        hint = ' (images lie directly in it: put each class in its own sub-folder)' if loose else ''
        raise UserInputError(f'{split_dir} has no class folders{hint}; expected {split_dir}/<class>/<image>')
    extensions = ', '.join(get_img_extensions())
    for name in classes:
        files = _files(split_dir / name)
        skipped = [f for f in files if _is_skipped_image(f.name)]
        if skipped:
            raise UserInputError(
                f'{len(skipped)} image(s) in {split_dir / name} (e.g. {skipped[0]}) have an extension timm\'s '
                f'ImageFolder reader skips (it reads {extensions}); convert them, or call '
                f'timm.data.add_img_extensions({skipped[0].suffix.lower()!r}) before training')
        if not any(_is_image(f.name) for f in files):
            raise UserInputError(f'class folder {split_dir / name} has no images ({extensions}); '
                                 'add images or remove the folder')
    if verify_images:
        for dirpath, _, files in os.walk(split_dir):
            for f in files:
                if _is_image(f):
                    _check_readable(Path(dirpath) / f)
    return classes


def _check_readable(path: Path) -> None:
    try:
        with Image.open(path) as img:
            img.size  # noqa: B018  header parsed
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserInputError(f'unreadable image file {path}: {e}; fix or remove it') from None


def training_interpolation(args: argparse.Namespace, data_config: Dict[str, Any]) -> str:
    """The resampling of training crops: ``--train-interpolation``, or the model's own where it is unset or
    ``--no-aug`` asks for the evaluation transform (as timm's train.py)."""
    return data_config['interpolation'] if args.no_aug or not args.train_interpolation else args.train_interpolation
