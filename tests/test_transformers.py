"""Published weights through Hugging Face transformers (its TimmWrapper), offline: from the folder itself and
by Hub id from the local olah server, matching timm's logits and top-3 on a real photo."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

import aft_vit  # noqa: F401  registers the models
from tests.hub_server import HubServer

transformers = pytest.importorskip('transformers')
skimage_data = pytest.importorskip('skimage.data')

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = sorted(p for p in (ROOT / 'weights').glob('*.*') if p.is_dir())
CAT = Image.fromarray(skimage_data.chelsea())

HUB_SCRIPT = '''
import json, sys
import aft_vit
from PIL import Image
from skimage.data import chelsea
from transformers import AutoModelForImageClassification, TimmWrapperImageProcessor
model = AutoModelForImageClassification.from_pretrained(sys.argv[1]).eval()
# the processor from the downloaded config: olah answers a missing preprocessor_config.json with 401 "repository
# not found" where the Hub answers 404, which AutoImageProcessor takes as "no such repository"
processor = TimmWrapperImageProcessor(pretrained_cfg=model.config.pretrained_cfg)
print(json.dumps(model(**processor(Image.fromarray(chelsea()), return_tensors='pt')).logits.tolist()))
'''


def _timm_logits(folder: Path) -> torch.Tensor:
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    with torch.no_grad():
        return model(transform(CAT).unsqueeze(0))


@pytest.mark.parametrize('folder', PUBLISHED, ids=lambda p: p.name)
def test_published_folder_loads_in_transformers_pipeline(folder):
    model = transformers.AutoModelForImageClassification.from_pretrained(str(folder)).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(str(folder))
    expected = _timm_logits(folder)
    with torch.no_grad():
        logits = model(**processor(CAT, return_tensors='pt')).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)

    classify = transformers.pipeline('image-classification', model=model, image_processor=processor)
    top = classify(CAT, top_k=3)
    probs, indices = expected.softmax(-1)[0].topk(3)
    labels = json.loads((folder / 'config.json').read_text())['label_names']
    assert [p['label'] for p in top] == [labels[i] for i in indices]
    assert [p['score'] for p in top] == pytest.approx(probs.tolist(), abs=1e-5)


def test_hub_id_loads_in_transformers_offline(tmp_path):
    """from_pretrained('aft-vit/<model>.<tag>') downloads from the local server into an empty HF_HOME."""
    folder = PUBLISHED[0]
    server = HubServer(tmp_path / 'olah').start()
    try:
        server.add_repo(f'aft-vit/{folder.name}', folder)
        env = dict(os.environ, HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / 'hf_home'), PYTHONPATH=str(ROOT),
                   HF_HUB_DISABLE_TELEMETRY='1')
        env.pop('HF_TOKEN', None)
        result = subprocess.run([sys.executable, '-c', HUB_SCRIPT, f'aft-vit/{folder.name}'], capture_output=True,
                                text=True, env=env, timeout=300)
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr[-3000:]
    logits = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(logits, _timm_logits(folder), rtol=1e-5, atol=1e-5)
    assert list((tmp_path / 'hf_home').rglob('model.safetensors')), 'nothing was downloaded'


def test_import_aft_vit_leaves_optional_libraries_alone():
    """transformers, onnx and onnxruntime are test extras: importing the package must not need them."""
    code = ('import sys, aft_vit, aft_vit.cli; '
            'print(sorted(m for m in ("transformers", "onnx", "onnxruntime", "onnxscript") if m in sys.modules))')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.strip() == '[]'
