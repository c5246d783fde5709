"""ONNX export: torch's default (dynamo) exporter on every mixer, AFT-conv with a dynamic batch, height and width
run in onnxruntime at several sizes, and the ``aft-vit export`` command on published weights."""
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import aft_vit  # noqa: F401  registers the models
from aft_vit.cli import main

onnxruntime = pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')

ATOL = 1e-4
CIFAR = f'local-dir:{Path(__file__).resolve().parent.parent / "weights" / "aft_conv_tiny_stem4_32.cifar10"}'


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Random values everywhere (AFT-conv's gamma / beta start at 0, which would hide the kernel)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _export(model: torch.nn.Module, example: torch.Tensor, path, dims) -> 'onnxruntime.InferenceSession':
    """What a user writes: torch.onnx.export with Dim.AUTO dimensions, nothing from aft_vit."""
    with torch.no_grad():
        torch.onnx.export(model, (example,), str(path), dynamic_shapes={'x': dims})
    return onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])


def _max_difference(session, model, x: torch.Tensor) -> float:
    with torch.no_grad():
        expected = model(x).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return float(np.abs(got - expected).max())


@pytest.mark.parametrize('name', ['aft_conv_tiny', 'aft_full_tiny', 'aft_local_tiny', 'aft_simple_tiny'])
def test_every_mixer_exports_with_a_dynamic_batch(name, tmp_path):
    model = _perturbed(timm.create_model(name, depth=1, img_size=64, num_classes=10))
    session = _export(model, torch.randn(2, 3, 64, 64), tmp_path / 'm.onnx', {0: torch.export.Dim.AUTO})
    for batch in (1, 3):
        assert _max_difference(session, model, torch.randn(batch, 3, 64, 64)) < ATOL, (name, batch)


def test_aft_conv_exported_once_runs_at_any_size(tmp_path):
    """One file, dynamic batch, height and width: the sizes the issue names, each checked against PyTorch.
    224 px is a 14 x 14 grid (the dense path in eager PyTorch), 320 px 20 x 20 (the convolution path)."""
    model = _perturbed(timm.create_model('aft_conv_tiny', depth=2, num_classes=10))
    auto = torch.export.Dim.AUTO
    session = _export(model, torch.randn(2, 3, 224, 224), tmp_path / 'conv.onnx', {0: auto, 2: auto, 3: auto})
    g = torch.Generator().manual_seed(1)
    for height, width in ((224, 224), (320, 320), (160, 224)):
        for batch in (1, 3):
            x = torch.randn(batch, 3, height, width, generator=g)
            assert _max_difference(session, model, x) < ATOL, (height, width, batch)


def test_export_command_on_published_weights(tmp_path, capsys):
    """aft-vit export from a local-dir: folder, checked in onnxruntime on skimage's cat by the command itself."""
    out = tmp_path / 'cifar.onnx'
    assert main(['export', '--model', CIFAR, '--output', str(out)]) == 0
    printed = capsys.readouterr().out
    assert 'dynamic batch, height, width' in printed and printed.count('max |difference|') == 4
    session = onnxruntime.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    model = timm.create_model(CIFAR, pretrained=True).eval()
    assert _max_difference(session, model, torch.randn(2, 3, 48, 40)) < ATOL
    assert [p.name for p in tmp_path.iterdir()] == ['cifar.onnx']  # no temporary file left behind


def test_export_command_refuses_a_file_that_does_not_match(tmp_path, capsys):
    """A tolerance nothing can meet: the command fails, says by how much, and leaves no file."""
    out = tmp_path / 'strict.onnx'
    code = main(['export', '--model', CIFAR, '--output', str(out),
                 '--atol', '-1'])
    assert code == 2 and 'differs from PyTorch by up to' in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
