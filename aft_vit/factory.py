"""Model creation and weight loading for the command line, with errors that name the problem."""
from typing import Any, Dict, Optional

import timm
import torch

from .checkpoint import check_architecture, load_checkpoint_file
from .errors import PretrainedWeightsError, UserInputError


def create_model_checked(name: str, **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model`` that turns an unknown name into a one-line UserInputError."""
    try:
        return timm.create_model(name, **kwargs)
    except PretrainedWeightsError as e:
        raise UserInputError(str(e)) from None
    except RuntimeError as e:
        if 'Unknown model' in str(e):
            raise UserInputError(f'unknown model {name!r}; `aft-vit models` lists the AFT ones, '
                                 '`python -c "import timm; print(timm.list_models())"` all of timm') from None
        if 'No pretrained weights' in str(e):
            raise UserInputError(f'{e} (pass --checkpoint FILE to use your own weights)') from None
        raise


def _first_detail(error: Exception) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return lines[1] if len(lines) > 1 else (lines[0] if lines else type(error).__name__)


def load_weights(
        model: torch.nn.Module,
        path: str,
        model_name: str,
        use_ema: bool = False,
        checkpoint: Optional[Dict[str, Any]] = None,
) -> None:
    """Load a timm-format checkpoint (or a bare state dict) into ``model``, strictly.

    The EMA weights (``state_dict_ema``) are used when ``use_ema`` and present.
    """
    checkpoint = checkpoint if checkpoint is not None else load_checkpoint_file(path)
    check_architecture(checkpoint, path, model_name)
    key = next((k for k in (['state_dict_ema', 'model_ema'] if use_ema else []) + ['state_dict', 'model']
                if isinstance(checkpoint.get(k), dict)), None)
    state_dict = checkpoint[key] if key else checkpoint
    state_dict = {k[7:] if k.startswith('module.') else k: v for k, v in state_dict.items()}
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise UserInputError(f'checkpoint {path} does not fit {model_name}: {_first_detail(e)}') from None
