"""Training checkpoints in timm's format (``state_dict``, ``optimizer``, ``epoch``, ``version`` 2, ...),
written atomically so that a kill at any moment leaves the previous file whole."""
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import torch

from .errors import UserInputError

CHECKPOINT_VERSION = 2  # timm's: the saved epoch is complete, resume starts at epoch + 1


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, flush it to disk, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """Load a checkpoint dict on the CPU (weights only: no code runs), with a clear error if it can't be read."""
    if not os.path.isfile(path):
        raise UserInputError(f'checkpoint {path} does not exist')
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises several types for truncated / foreign files
        raise UserInputError(f'checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}); '
                             'is it a complete PyTorch checkpoint?') from None
    if not isinstance(checkpoint, dict):
        raise UserInputError(f'checkpoint {path} holds a {type(checkpoint).__name__}, not a state dict')
    return checkpoint


def check_architecture(checkpoint: Dict[str, Any], path: str, model_name: str) -> None:
    """Refuse a checkpoint saved for another architecture (timm's ``arch`` entry)."""
    arch = checkpoint.get('arch')
    if arch is not None and arch.split('.')[0] != model_name.split('.')[0]:
        raise UserInputError(f'checkpoint {path} is for {arch}, not {model_name}; pass --model {arch} '
                             'or a checkpoint of this model')


def command_history(trained_with: Dict[str, Any]) -> List[str]:
    """The commands a checkpoint's run took (its ``args``), in order: a resumed run's weights come from all of them."""
    history = trained_with.get('command_history')
    if history:
        return list(history)
    return [trained_with['command']] if trained_with.get('command') else []
