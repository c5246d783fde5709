"""Model creation for the command line, with errors that name the problem."""
from typing import Any

import timm
import torch

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
