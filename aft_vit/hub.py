"""``aft-vit publish``: turn a training checkpoint into a Hugging Face Hub model repository folder in timm's format.

``weights/<model>.<tag>/`` gets ``config.json`` (timm's ``save_for_hf``: architecture, num_classes, model args,
pretrained_cfg with label names, mean / std, input size, crop), ``model.safetensors`` (no pickles) and a model
card ``README.md`` whose accuracy is measured here, by ``aft-vit eval`` on a named split, never typed in. The
weight file's sha256 goes into ``weights/SHA256SUMS`` (``sha256sum -c`` format), which the tests check.
The folder is assembled in a temporary folder and moved into place at the end.
"""
import argparse
import hashlib
import json
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import timm
import torch
from timm.models import get_pretrained_cfg, save_for_hf

import aft_vit
from . import evaluate
from .checkpoint import atomic_folder, command_history, has_ema, load_checkpoint_file
from .errors import UserInputError
from .labels import imagenet_descriptions

SUMS_FILE = 'SHA256SUMS'
RUNTIME_MODEL_ARGS = ('num_classes', 'global_pool')
CITATION = '''@article{zhai2021attention,
  title={An Attention Free Transformer},
  author={Zhai, Shuangfei and Talbott, Walter and Srivastava, Nitish and Huang, Chen and Goh, Hanlin and Zhang, Ruixiang and Susskind, Josh},
  journal={arXiv preprint arXiv:2105.14103},
  year={2021}
}'''


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _training_time(wall_seconds: Optional[float]) -> str:
    if not wall_seconds:
        return 'Wall time: not recorded in the checkpoint (trained before aft_vit recorded it).'
    hours, rest = divmod(round(wall_seconds), 3600)
    minutes, seconds = divmod(rest, 60)
    took = f'{hours} h {minutes:02d} min' if hours else f'{minutes} min {seconds:02d} s'
    return f'Wall time: {took} of training and per-epoch evaluation, summed over the epochs of every run below.'


def _commands_with_machines(history: List[str], machines: List[str], precisions: List[str]) -> str:
    """The training commands in order, each after a comment naming the machine it ran on and the precision it
    trained in (where recorded)."""
    if len(machines) != len(history):
        return '\n'.join(history)
    if len(precisions) != len(history):
        precisions = [''] * len(history)
    return '\n'.join(f'# on {machine}{", in " + precision if precision else ""}\n{command}'
                     for machine, precision, command in zip(machines, precisions, history))


def _classes_section(label_names: Optional[Sequence[str]]) -> str:
    """What the model knows: its classes in output order, with their WordNet descriptions where the names are
    ImageNet WordNet ids (Imagenette's folders), so a reader need not look the ids up."""
    if not label_names:
        return 'Class names: not recorded in the checkpoint.'
    descriptions = imagenet_descriptions(label_names)
    if descriptions:
        rows = [f'| {i} | `{name}` | {descriptions[name]} |' for i, name in enumerate(label_names)]
        return '\n'.join(['| index | WordNet id | WordNet name |', '| --- | --- | --- |', *rows])
    rows = [f'| {i} | {name} |' for i, name in enumerate(label_names)]
    return '\n'.join(['| index | class |', '| --- | --- |', *rows])


def _input_size(data_config: Dict[str, Any]) -> str:
    """``224 px`` for a square input, ``160x224 px`` (height x width) otherwise."""
    height, width = data_config['input_size'][-2:]
    return f'{width} px' if height == width else f'{height}x{width} px'


def _evaluation_rows(evaluations: Sequence[Dict[str, Any]]) -> str:
    """One table row per evaluation: the published input size first, then any other size it was measured at."""
    return '\n'.join(
        f"| {Path(r['split']).name} | {_input_size(r['data_config'])} | {r['images']} | {r['top1']:.2f} | "
        f"{r['top5']:.2f} | {r['loss']:.4f} |" for r in evaluations)


def _model_card(name: str, model, evaluations: Sequence[Dict[str, Any]], checkpoint: Dict[str, Any], args,
                weights: str, sha: str) -> str:
    """The README.md of a published folder. ``evaluations``: :func:`aft_vit.evaluate.run` results, the first at
    the published input size."""
    results = evaluations[0]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    size = results['data_config']['input_size']
    trained_with = checkpoint.get('args') or {}
    history = command_history(trained_with) or ['(not recorded in the checkpoint)']
    command = _commands_with_machines(history, list(trained_with.get('machine_history') or []),
                                      list(trained_with.get('precision_history') or []))
    resumed = (f'Trained in {len(history)} runs, each resuming from the previous one\'s checkpoint (`--resume`):\n\n'
               if len(history) > 1 else '')
    recipe = trained_with.get('config') or '(command-line arguments only)'
    repo = args.repo_id or f'ORG/{name}'
    return f'''---
library_name: timm
license: {args.license}
tags:
- image-classification
- timm
- aft_vit
- attention-free-transformer
datasets:
- {args.dataset_id}
metrics:
- accuracy
---
# {name}

An Attention Free Transformer (Zhai et al., 2021, [arXiv:2105.14103](https://arxiv.org/abs/2105.14103)) image
classifier, `{model.pretrained_cfg.get('architecture', results['model'])}` from
[aft_vit](https://pypi.org/project/aft-vit/), a timm plugin: {params:.2f}M parameters, input
{size[1]}x{size[2]}, {model.num_classes} classes.

## Training data

Trained on **{args.dataset_name}**, nothing else (no ImageNet pre-training unless the command below says so).

## Evaluation

Measured by `aft-vit eval` when this folder was published (aft_vit {aft_vit.__version__}, timm {timm.__version__}):

| split | input | images | top-1 | top-5 | loss |
| --- | --- | --- | --- | --- | --- |
{_evaluation_rows(evaluations)}

Weights: {weights}; `model.safetensors` sha256 `{sha}`.

## Classes

{_classes_section(checkpoint.get('label_names'))}

## Training command

Recipe: `{recipe}`

{_training_time(checkpoint.get('wall_seconds'))}

{resumed}```bash
{command}
```

## Usage

```python
import timm, torch
import aft_vit  # registers the aft models in timm: import it first

model = timm.create_model('hf-hub:{repo}', pretrained=True).eval()
config = timm.data.resolve_data_config({{}}, model=model)
transform = timm.data.create_transform(**config)
# probabilities = model(transform(image).unsqueeze(0)).softmax(-1)
```

## Citation

```bibtex
{CITATION}
```
'''


def tag_description(architecture: str, tag: str) -> Optional[str]:
    """The registry's description of ``<architecture>.<tag>``; None for a tag it does not know. A checkpoint's
    model is built under its architecture's default tag, whose description tells of other weights."""
    try:
        cfg = get_pretrained_cfg(f'{architecture}.{tag}')
    except RuntimeError:  # a tag the registry does not know (yet)
        return None
    return getattr(cfg, 'description', None)  # cfg is None for an architecture timm does not know


def save_hub_files(model: torch.nn.Module, folder: Path, tag: str, label_names: Optional[Sequence[str]],
                   data_config: Dict[str, Any]) -> str:
    """``config.json`` and ``model.safetensors`` of a Hub repository in timm's format; returns the weights' sha256.

    timm's ``save_for_hf`` writes them; the config then gets the published ``tag`` in its ``pretrained_cfg``
    (not the tag the model was built under), with that tag's description (:func:`tag_description`; none for a tag
    the registry does not know), and ``model_args`` keeps only architecture arguments:
    ``num_classes`` and ``global_pool`` are the config's own top-level fields, and loaders such as transformers'
    TimmWrapper pass ``num_classes`` themselves.
    """
    label_names = list(label_names) if label_names else None
    labels = dict(label_names=label_names, label_descriptions=imagenet_descriptions(label_names))
    model_config = {k: v for k, v in labels.items() if v}
    model_config['pretrained_cfg'] = dict(tag=tag)
    data_config = {k: data_config[k] for k in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct')}
    save_for_hf(model, folder, model_config=model_config, safe_serialization=True, data_config=data_config)
    config_path = folder / 'config.json'
    config = json.loads(config_path.read_text(encoding='utf-8'))
    config['pretrained_cfg'].pop('description', None)
    description = tag_description(config['architecture'], tag)
    if description:
        config['pretrained_cfg']['description'] = description
    model_args = config.get('model_args', {})
    for key in RUNTIME_MODEL_ARGS:
        model_args.pop(key, None)
    if model_args.get('in_chans') == 3:
        del model_args['in_chans']  # the default; kept only when the stem differs
    config_path.write_text(json.dumps(config, indent=2) + '\n', encoding='utf-8')
    return sha256_of(folder / 'model.safetensors')


def _write_sums(root: Path, name: str, sha: str) -> None:
    """Record ``sha`` for ``name`` in ``root/SHA256SUMS``, replacing an older line, atomically."""
    path = root / SUMS_FILE
    entry = f'{name}/model.safetensors'
    lines = [ln for ln in (path.read_text().splitlines() if path.exists() else []) if not ln.endswith('  ' + entry)]
    lines = sorted(lines + [f'{sha}  {entry}'], key=lambda ln: ln.split('  ', 1)[1])
    tmp = path.with_name(f'.{SUMS_FILE}.tmp')
    tmp.write_text('\n'.join(lines) + '\n')
    os.replace(tmp, path)


def publish(args: argparse.Namespace) -> Path:
    """Evaluate the checkpoint, write the repository folder, record its sha256, optionally push it."""
    checkpoint = load_checkpoint_file(args.checkpoint)
    ema_used = has_ema(checkpoint) and not args.no_ema
    loaded = evaluate.load_model(checkpoint=args.checkpoint, checkpoint_data=checkpoint, use_ema=ema_used)
    name = f'{loaded.name.split(".")[0]}.{args.tag}'
    out_root = Path(args.output)
    final = out_root / name
    if final.exists() and not args.force:
        raise UserInputError(f'{final} already exists; pass --force to replace it')

    model = loaded.model.eval()
    run = partial(evaluate.run, loaded, args.data_dir, args.split, batch_size=args.batch_size, workers=args.workers,
                  progress=False)
    results = run()
    channels = results['data_config']['input_size'][0]
    evaluations = [results, *(run(data_args=dict(input_size=(channels, px, px))) for px in args.extra_img_sizes)]
    weights = (f"{'the EMA weights' if ema_used else 'the trained weights'} of `{Path(args.checkpoint).name}` "
               f"(epoch {checkpoint.get('epoch')})")
    with atomic_folder(final) as tmp:
        sha = save_hub_files(model.cpu(), tmp, args.tag, checkpoint.get('label_names'), results['data_config'])
        card = _model_card(name, model, evaluations, checkpoint, args, weights, sha)
        (tmp / 'README.md').write_text(card, encoding='utf-8')
    _write_sums(out_root, name, sha)
    for measured in evaluations:
        print(f'{final}: top-1 {measured["top1"]:.2f} on {measured["images"]} {Path(measured["split"]).name} images '
              f'at {_input_size(measured["data_config"])}')
    print(f'{final}: sha256 {sha}')
    if args.push:
        push(final, args.repo_id)
    return final


def push(folder: Path, repo_id: Optional[str]) -> str:
    """Upload a published folder to the Hub (token from the usual huggingface_hub sources)."""
    if not repo_id:
        raise UserInputError('--push needs --repo-id ORG/NAME')
    from huggingface_hub import HfApi
    api = HfApi(library_name='aft_vit', library_version=aft_vit.__version__)
    api.create_repo(repo_id, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=f'Add {folder.name}')
    print(f'pushed {folder} to {repo_id}')
    return str(commit)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='aft-vit publish', description=__doc__.split('\n\n')[0])
    parser.add_argument('--checkpoint', required=True, help='training checkpoint (aft-vit train or timm train.py)')
    parser.add_argument('--tag', required=True, help='pretrained tag, e.g. cifar10: the folder is <model>.<tag>')
    parser.add_argument('--data-dir', required=True, help='ImageFolder root of the evaluation data')
    parser.add_argument('--split', default='validation', help="evaluation split ('val' or 'test' are found too)")
    parser.add_argument('--dataset-name', required=True, help='the training data, named honestly, for the model card')
    parser.add_argument('--dataset-id', required=True, help='Hub dataset id for the card metadata, e.g. cifar10')
    parser.add_argument('--extra-img-sizes', type=int, nargs='+', default=[], metavar='PX',
                        help='also evaluate at these sizes (e.g. the training size, where the published input size '
                             'differs) and list them in the card; the config keeps the checkpoint\'s input size')
    parser.add_argument('--license', default='apache-2.0')
    parser.add_argument('--output', default='weights', help='parent folder of the repository folders')
    parser.add_argument('--no-ema', action='store_true', help='publish the trained weights even if EMA weights exist')
    parser.add_argument('--force', action='store_true', help='replace an existing folder')
    parser.add_argument('--push', action='store_true', help='upload the folder to the Hub')
    parser.add_argument('--repo-id', default=None, help='Hub repository, ORG/NAME (for --push and the card)')
    parser.add_argument('-b', '--batch-size', type=int, default=128)
    parser.add_argument('-j', '--workers', type=int, default=min(4, os.cpu_count() or 1))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    publish(build_parser().parse_args(argv))
    return 0


if __name__ == '__main__':
    sys.exit(main())
