"""README.md stays true: its usage example runs, its commands match .ci/run, its ours-column matches the models."""
import re
import subprocess
import sys
from pathlib import Path

import timm

from aft_vit.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / 'README.md').read_text(encoding='utf-8')


def _blocks(lang):
    return re.findall(rf'```{lang}\n(.*?)```', README, flags=re.S)


def test_usage_example_runs_and_prints_what_it_claims():
    code = next(b for b in _blocks('python') if 'create_model' in b)
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert 'torch.Size([2, 10])' in out


def test_ci_runs_the_readme_commands():
    ci = (ROOT / '.ci' / 'run').read_text(encoding='utf-8')
    for block in _blocks('bash'):
        for line in block.strip().splitlines():
            assert line in ci, f'README command {line!r} is not what .ci/run runs'


def test_readme_parameter_column_matches_models(capsys):
    assert main(['models']) == 0
    listing = capsys.readouterr().out
    for row in re.findall(r'^\| (aft_\w+) \|.*\| ([\d.]+)M \|$', README, flags=re.M):
        name, ours = row
        measured = re.search(rf'^{name}\s.*?\s([\d.]+)M\s', listing, flags=re.M).group(1)
        assert measured == ours, f'README says {name} has {ours}M, the model has {measured}M'
    assert len(re.findall(r'^aft_', listing, flags=re.M)) == len(timm.list_models('aft_*'))


def test_models_command_rejects_unknown_filter(capsys):
    assert main(['models', 'nothing_like_this*']) == 2
    assert 'no AFT model matches' in capsys.readouterr().err
