"""The committed recipe-study tables are what their rows' own files compute, and the study runner resumes a
stopped row instead of starting it again."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from aft_vit.train import parse_args
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
STUDIES = sorted((ROOT / 'results').glob('*/study.yaml'))


def _study_module():
    return load_script('results/study.py')


@pytest.mark.parametrize('study_yaml', STUDIES, ids=lambda p: p.parent.name)
def test_study_table_is_computed_from_its_rows(study_yaml):
    """study.md == the table written from each row's committed summary.csv and wall.json (no number typed in)."""
    study = yaml.safe_load(study_yaml.read_text())
    expected = _study_module().table(study, study['rows'], study_yaml.parent / 'study')
    assert (study_yaml.parent / 'study.md').read_text() == expected, \
        f'rerun: python results/study.py {study_yaml.relative_to(ROOT)} --table-only'
    for row in study['rows']:
        assert row.get('base') is None or row['base'] in {r['name'] for r in study['rows']}, row['name']
        command = _study_module().row_command(study, row, ROOT / 'output' / 'unused' / row['name'])
        args = parse_args(command[2:])  # aft-vit train takes the row: its recipe exists, its arguments parse
        assert args.epochs == row.get('epochs', study['epochs']) and args.val_split == study['val_split'], row['name']


def test_a_stopped_row_resumes_and_a_finished_one_is_not_run_again(tmp_path, monkeypatch):
    study_mod = _study_module()
    study = dict(data_dir='data/x-holdout', val_split='holdout', epochs=2)
    row = dict(name='r', config='c.yaml', args=['--lr', '2e-3'])
    out = tmp_path / 'r'
    cmd = study_mod.row_command(study, row, out)
    assert cmd[:2] == ['aft-vit', 'train'] and cmd[-2:] == ['--lr', '2e-3'] and '--resume' not in cmd
    assert cmd[cmd.index('--epochs') + 1] == '2' and cmd[cmd.index('--val-split') + 1] == 'holdout'
    out.mkdir()
    (out / 'last.pth.tar').write_bytes(b'')
    assert study_mod.row_command(study, row, out)[-2:] == ['--resume', str(out / 'last.pth.tar')]
    (out / 'summary.csv').write_text('epoch,train_loss\n0,2.0\n1,1.5\n')
    (out / 'args.yaml').write_text('epochs: 2\n')
    (out / 'wall.json').write_text('[]')
    monkeypatch.setattr(study_mod.subprocess, 'run', lambda *a, **k: pytest.fail('a finished row was run again'))
    study_mod.run_row(study, row, out, tmp_path / 'record')
    assert sorted(p.name for p in (tmp_path / 'record').iterdir()) == ['args.yaml', 'summary.csv', 'wall.json']
    calls = []

    def ran(cmd, **kwargs):
        calls.append(cmd)
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(study_mod.subprocess, 'run', ran)
    study_mod.run_row(study, dict(row, epochs=3), out, tmp_path / 'record')  # its own budget: 2 epochs are not all
    assert calls[0][calls[0].index('--epochs') + 1] == '3' and calls[0][-2:] == ['--resume', str(out / 'last.pth.tar')]
