"""README.md stays true: its usage example runs, its commands match .ci/run, its ours-column matches the models."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import yaml

from aft_vit.cli import main
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / 'README.md').read_text(encoding='utf-8')


def _plot_curves():
    return load_script('results/plot_curves.py')


def _blocks(lang):
    return re.findall(rf'```{lang}\n(.*?)```', README, flags=re.S)


def test_usage_example_runs_and_prints_what_it_claims():
    code = next(b for b in _blocks('python') if 'create_model' in b and 'chelsea' not in b)
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert 'torch.Size([2, 10])' in out


def test_ci_runs_the_readme_setup_and_test_commands():
    ci = (ROOT / '.ci' / 'run').read_text(encoding='utf-8')
    setup = _blocks('bash')[0]
    tests = next(b for b in _blocks('bash') if 'pytest' in b)
    for line in setup.strip().splitlines() + tests.strip().splitlines():
        assert line in ci, f'README command {line!r} is not what .ci/run runs'


def test_readme_main_job_uses_the_shipped_recipe_and_data():
    main_job = next(b for b in _blocks('bash') if 'aft-vit train' in b).strip()
    assert '../shared/data/cifar10-jpg.zip' in main_job
    recipe = re.search(r'--config (\S+)', main_job).group(1)
    assert (ROOT / recipe).is_file()


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


def test_results_table_shows_the_measured_results():
    """Every row of README's results table is what results/<data>/<model>/ recorded (eval JSON, epochs, size)."""
    rows = re.findall(r'^\| (cifar10|imagenette) \| (\d+) px \| (\d+) px \| (\d+) \| ([\d.]+) \| ([\d.]+) \|',
                      README, flags=re.M)
    assert len(rows) == 3
    for data, trained_px, eval_px, epochs, *shown in rows:
        for model, top1 in zip(('aft_conv_tiny', 'deit_tiny'), shown):
            run = ROOT / 'results' / data / model
            measured = json.loads((run / f'eval_{eval_px}.json').read_text())
            assert top1 == f'{measured["top1"]:.2f}', (data, model, eval_px)
            args = yaml.safe_load((run / 'args.yaml').read_text())
            assert (args['img_size'], args['epochs']) == (int(trained_px), int(epochs))
            assert len((run / 'summary.csv').read_text().strip().splitlines()) == int(epochs) + 1


# The final evaluation each dataset's runs are reported by: its json, split and number of images
RUN_EVALUATIONS = {'cifar10': ('eval_32.json', 'test', 10000), 'imagenette': ('eval_224.json', 'val', 3925)}


def _run_rows(data: str):
    """The rows of README's table of ``results/<data>/`` runs (long runs, matched pairs, GPU lease)."""
    table = re.search(rf'^\| run \(`results/{data}/`\) \|.*?\n\n', README, flags=re.M | re.S).group(0)
    return re.findall(r'^\| `((?:long|matched|gpu-lease)\w*/[\w-]+)` \| `(\w+)` \| ([\d.]+)M \| (\d+) \| '
                      r'(?:(\d+) h )?(\d+) min \| ([\d.]+) \| ([\d.]+) \|', table, flags=re.M)


RUN_ROWS = [(data, *row) for data in RUN_EVALUATIONS for row in _run_rows(data)]


@pytest.mark.parametrize('data', sorted(RUN_EVALUATIONS))
def test_readme_shows_the_long_run(data):
    long_runs = [row for row in RUN_ROWS if row[0] == data and row[1].startswith('long')]
    assert long_runs, f'no {data} long-run row in README'


@pytest.mark.parametrize('row', RUN_ROWS, ids=lambda row: f'{row[0]}/{row[1]}')
def test_run_row_is_what_the_run_recorded(row):
    """A README row of a long run / matched pair: the top-1/top-5 of its final evaluation, the epochs and summed
    train_seconds of summary.csv, the model, its parameter count and recipe from args.yaml; and the schedule is
    one warm-up and one decay (no restart)."""
    data, run, model, params, epochs, hours, minutes, top1, top5 = row
    folder = ROOT / 'results' / data / run
    eval_file, split, images = RUN_EVALUATIONS[data]
    measured = json.loads((folder / eval_file).read_text())
    assert (top1, top5) == (f'{measured["top1"]:.2f}', f'{measured["top5"]:.2f}')
    assert Path(measured['split']).name == split and measured['images'] == images
    args = yaml.safe_load((folder / 'args.yaml').read_text())
    assert (args['model'], args['experiment'], args['epochs']) == (model, folder.name, int(epochs))
    assert f'--config {args["config"]}' in README
    size = dict(img_size=args['img_size']) if args['img_size'] else {}
    built = timm.create_model(model, device='meta', num_classes=args['num_classes'], **size, **args['model_kwargs'])
    assert params == f'{sum(p.numel() for p in built.parameters()) / 1e6:.2f}'
    plot_curves = _plot_curves()
    summary = plot_curves.read_summary(folder / 'summary.csv')
    assert summary['epoch'] == list(range(int(epochs)))
    assert plot_curves.schedule_restarts(summary['lr']) == []
    assert round(sum(summary['train_seconds']) / 60) == int(hours or 0) * 60 + int(minutes)


def test_plot_marks_where_a_run_was_resumed_with_a_longer_schedule():
    plot_curves = _plot_curves()
    warmup_then_cosine = [1e-3, 7e-4, 3e-4, 1e-5]
    assert plot_curves.schedule_restarts(warmup_then_cosine) == []
    assert plot_curves.schedule_restarts([5e-4, *warmup_then_cosine]) == []  # a 2-epoch warm-up is no restart
    assert plot_curves.schedule_restarts([*warmup_then_cosine, 6e-4, 2e-4]) == [4]
    # README: all four runs were resumed with a longer schedule, CIFAR-10 at epoch 5, Imagenette at epoch 8
    for model in ('aft_conv_tiny', 'deit_tiny'):
        for data, restarts in (('cifar10', [5]), ('imagenette', [8])):
            lr = plot_curves.read_summary(ROOT / 'results' / data / model / 'summary.csv')['lr']
            assert plot_curves.schedule_restarts(lr) == restarts, (data, model)


def test_training_curves_plot_every_group_of_runs_in_results(tmp_path):
    subprocess.run([sys.executable, str(ROOT / 'results' / 'plot_curves.py'), '--out-dir', str(tmp_path)],
                   check=True, capture_output=True)
    groups = {p.parent.parent.relative_to(ROOT / 'results') for p in (ROOT / 'results').rglob('summary.csv')}
    assert groups and {'cifar10', 'imagenette'} <= {g.as_posix() for g in groups}
    for group in groups:
        assert (tmp_path / group / 'training_curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', group


def test_a_run_evaluated_only_at_the_end_is_plotted_with_that_evaluation(tmp_path):
    plot_curves = _plot_curves()
    run = tmp_path / 'long' / 'aft_run'
    run.mkdir(parents=True)
    (run / 'summary.csv').write_text('epoch,train_loss,lr\n0,2.0,1e-3\n1,1.5,1e-6\n')
    assert plot_curves.final_evaluations(run) == []
    (run / 'eval_32.json').write_text(json.dumps({'split': '/data/cifar10-jpg/test', 'top1': 91.25}))
    (run / 'eval_128.json').write_text(json.dumps({'split': '/data/cifar10-jpg/test', 'top1': 88.5}))
    assert plot_curves.final_evaluations(run) == [(32, 'test', 91.25), (128, 'test', 88.5)]
    assert plot_curves.find_runs(tmp_path) == {'long': {'aft_run': run}}
    out = plot_curves.plot_group('long', {'aft_run': run}, tmp_path / 'long' / 'training_curves.png')
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
