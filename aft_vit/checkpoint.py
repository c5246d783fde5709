"""Reading and writing weights: the one place that opens checkpoints, picks their state dict and checks
that they fit.

* Training checkpoints are in timm's format (``state_dict``, ``optimizer``, ``epoch``, ``version`` 2, ``arch``,
  ...), written atomically so that a kill at any moment leaves the previous file whole.
* The state dict of a checkpoint is picked by timm's rule (``timm.models.load_state_dict``): with ``use_ema``,
  ``state_dict_ema`` (else ``model_ema``) if the checkpoint has one; otherwise ``state_dict``, else ``model``,
  else the file is a bare state dict. Wrapper prefixes (``module.`` from DDP, ``_orig_mod.`` from
  torch.compile) are stripped by timm's ``clean_state_dict``.
* Which weights a command takes: those that continue or evaluate a run (``aft-vit eval`` / ``predict``,
  ``train --initial-checkpoint``) take the trained weights unless ``--use-ema``; those that make a new
  artifact from a finished run (``aft-vit publish``, ``aft-vit convert``) take the EMA weights when there are
  any (``publish --no-ema`` opts out). ``--resume`` restores both.
* A checkpoint's architecture (``arch``) is checked once, when the file is read for a named model.
"""
import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from timm.models import clean_state_dict, get_pretrained_cfg

from .errors import PretrainedWeightsError, UserInputError

CHECKPOINT_VERSION = 2  # timm's: the saved epoch is complete, resume starts at epoch + 1


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` to write; on success it replaces ``path``, on any error it is removed, so
    ``path`` is never half-written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, flush it to disk, then rename over ``path``."""
    with atomic_file(path) as tmp, open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """A temporary folder beside ``final`` to fill; on success it replaces ``final``, on any error it is removed,
    so ``final`` is never half-written."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{final.name}.', dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_checkpoint_file(path: str, model_name: Optional[str] = None) -> Dict[str, Any]:
    """Load a checkpoint dict on the CPU (weights only: no code runs), with a clear error if it can't be read.

    With ``model_name``, a checkpoint saved for another architecture (its ``arch``) is refused here, once.
    """
    if not os.path.isfile(path):
        raise UserInputError(f'checkpoint {path} does not exist')
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises several types for truncated / foreign files
        raise UserInputError(f'checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}); '
                             'is it a complete PyTorch checkpoint?') from None
    if not isinstance(checkpoint, dict):
        raise UserInputError(f'checkpoint {path} holds a {type(checkpoint).__name__}, not a state dict')
    arch = checkpoint.get('arch')
    if model_name is not None and arch is not None and arch.split('.')[0] != model_name.split('.')[0]:
        raise UserInputError(f'checkpoint {path} is for {arch}, not {model_name}; pass --model {arch} '
                             'or a checkpoint of this model')
    return checkpoint


def select_state_dict(checkpoint: Mapping[str, Any], use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The checkpoint's state dict by timm's rule (module docstring), wrapper prefixes stripped."""
    keys = (['state_dict_ema', 'model_ema'] if use_ema else []) + ['state_dict', 'model']
    key = next((k for k in keys if isinstance(checkpoint.get(k), Mapping)), None)
    return clean_state_dict(checkpoint[key] if key else checkpoint)


def has_ema(checkpoint: Mapping[str, Any]) -> bool:
    return any(isinstance(checkpoint.get(k), Mapping) for k in ('state_dict_ema', 'model_ema'))


def _first_detail(error: Exception) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return lines[1] if len(lines) > 1 else (lines[0] if lines else type(error).__name__)


def load_weights(model: torch.nn.Module, checkpoint: Mapping[str, Any], source: str, model_name: str,
                 use_ema: bool = False) -> None:
    """Load the checkpoint's state dict (:func:`select_state_dict`) into ``model``, strictly."""
    try:
        model.load_state_dict(select_state_dict(checkpoint, use_ema))
    except RuntimeError as e:
        raise UserInputError(f'checkpoint {source} does not fit {model_name}: {_first_detail(e)}') from None


def check_weights_fit(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Refuse pretrained weights of another architecture, saying what differs.

    The classifier and the stem's input channels may differ: timm adapts those after the checkpoint filter.
    """
    expected = model.state_dict()
    adaptable = ('head.', 'patch_embed.proj.')
    missing = [k for k in expected if k not in state_dict and not k.startswith('head.')]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f'{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}' for k, v in state_dict.items()
             if k in expected and v.shape != expected[k].shape and not k.startswith(adaptable)]
    if missing or unexpected or wrong:
        problems = [f'{len(x)} {what} (e.g. {x[0]})' for x, what in
                    ((missing, 'missing'), (unexpected, 'unexpected'), (wrong, 'of another shape')) if x]
        architecture = getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)
        raise PretrainedWeightsError(
            f'not {architecture} weights: {", ".join(problems)}; check that the config names the architecture '
            'the weights were trained as (and its model_args)')


def _requested_source(variant: str, create_kwargs: Mapping[str, Any]) -> Tuple[str, Optional[str]]:
    """The weights a create_model call asks for, for error messages: (file, ``hf-hub:`` id or URL; the Hub
    repository id if they come from the Hub)."""
    tag = create_kwargs.get('pretrained_cfg')
    registered = get_pretrained_cfg(f'{variant}.{tag}') if isinstance(tag, str) else None
    for cfg in (create_kwargs.get('pretrained_cfg_overlay'), tag, registered):
        cfg = cfg.to_dict() if hasattr(cfg, 'to_dict') else cfg
        if not isinstance(cfg, Mapping):
            continue
        if cfg.get('file'):
            return cfg['file'], None
        if cfg.get('hf_hub_id'):
            return f'hf-hub:{cfg["hf_hub_id"]}', cfg['hf_hub_id']
        if cfg.get('url'):
            return cfg['url'], None
    return f'the pretrained weights of {variant}', None


def _error_chain(error: Optional[BaseException]) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _hub_advice(error: BaseException, repo_id: str) -> Optional[str]:
    """What went wrong fetching weights from the Hub and what to do, or None if it was not the Hub."""
    from huggingface_hub import errors as hub_errors
    chain = list(_error_chain(error))

    def found(*types: type) -> bool:
        return any(isinstance(e, types) for e in chain)

    local_dir = 'or load a downloaded folder with local-dir:PATH'
    if found(hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError):
        return (f'the Hub has no repository {repo_id} (or it is private or gated): check the id, load another '
                f'repository with hf-hub:ORG/NAME, {local_dir}')
    if found(hub_errors.RemoteEntryNotFoundError):
        return f'the Hub repository {repo_id} has no weights file: load another with hf-hub:ORG/NAME, {local_dir}'
    if found(hub_errors.OfflineModeIsEnabled):
        return (f'HF_HUB_OFFLINE is set and no copy of {repo_id} is cached: unset it once, with a network, to '
                f'download and cache it, {local_dir}')
    if found(hub_errors.LocalEntryNotFoundError, ConnectionError, TimeoutError):
        return (f'the Hub could not be reached and no copy of {repo_id} is cached: connect and try again; with a '
                f'copy fetched before, set HF_HUB_OFFLINE=1; {local_dir}')
    return None


@contextlib.contextmanager
def explain_pretrained_errors(variant: str, pretrained: bool, create_kwargs: Mapping[str, Any]) -> Iterator[None]:
    """Turn a failure to load pretrained weights into one PretrainedWeightsError naming the weights, telling
    apart weights of another architecture, a Hub that cannot be reached, a repository that does not exist and a
    bad file, and saying what to do. The caller's own argument errors (TypeError, ValueError) pass unchanged."""
    try:
        yield
    except Exception as e:
        if not pretrained:
            raise
        source, repo_id = _requested_source(variant, create_kwargs)
        if isinstance(e, PretrainedWeightsError):
            raise PretrainedWeightsError(f'cannot load {source} for {variant}: {e}') from None
        advice = _hub_advice(e, repo_id) if repo_id else None
        if advice:
            raise PretrainedWeightsError(f'cannot load {source} for {variant}: {advice}') from e
        if isinstance(e, (TypeError, ValueError)):
            raise
        detail = ' '.join(str(e).split())[:300] or type(e).__name__
        raise PretrainedWeightsError(
            f'cannot load {source} for {variant}: {type(e).__name__}: {detail}; '
            'the file may be missing, truncated or corrupt: fetch or publish it again') from e


def command_history(trained_with: Mapping[str, Any]) -> List[str]:
    """The commands a checkpoint's run took (its ``args``), in order: a resumed run's weights come from all of them."""
    history = trained_with.get('command_history')
    if history:
        return list(history)
    return [trained_with['command']] if trained_with.get('command') else []
