"""ImageFolder datasets for the command line: find the split folder and check it before training starts.

timm's readers quietly drop empty class folders (which changes the class count) and
skip unreadable images with a warning; a training run should instead stop at once and
name the folder or file.
"""
import os
from pathlib import Path
from typing import List

from PIL import Image, UnidentifiedImageError

from .errors import UserInputError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp')
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
    return name.lower().endswith(IMAGE_EXTENSIONS)


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
    for name in classes:
        images = [f for _, _, files in os.walk(split_dir / name) for f in files if _is_image(f)]
        if not images:
            raise UserInputError(f'class folder {split_dir / name} has no images ({", ".join(IMAGE_EXTENSIONS)}); '
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

