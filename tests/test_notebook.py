"""notebooks/finetune_custom_dataset.ipynb runs headless from top to bottom (its pretrained weights fetched from
a Hub mirror on 127.0.0.1 that serves weights/), shows that fine-tuning beats training from scratch at equal
steps, and is committed clean."""
import re
from pathlib import Path

import nbclient
import nbformat

from tests.hub_server import HubServer

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / 'notebooks' / 'finetune_custom_dataset.ipynb'


def test_committed_notebook_has_no_outputs_or_local_paths():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == 'code':
            assert not cell.outputs and cell.execution_count is None, 'stale outputs are committed'
    text = NOTEBOOK.read_text(encoding='utf-8')
    assert not re.search(r'(/work/|/tmp/|/home/|/root/|[A-Z]:\\\\)', text), 'a path of one machine is committed'


def test_notebook_fine_tunes_better_than_scratch_at_equal_steps(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    model = re.search(r"^MODEL = '([\w.]+)'", nb.cells[1].source, flags=re.M).group(1)
    server = HubServer(tmp_path / 'olah').start()
    try:
        server.add_repo(f'aft-vit/{model}', ROOT / 'weights' / model)
        monkeypatch.setenv('HF_ENDPOINT', server.url)
        monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf_home'))
        monkeypatch.setenv('HF_HUB_DISABLE_TELEMETRY', '1')
        monkeypatch.delenv('HF_TOKEN', raising=False)
        nbclient.NotebookClient(nb, timeout=900, kernel_name='python3',
                                resources={'metadata': {'path': str(NOTEBOOK.parent)}}).execute()
    finally:
        server.stop()
    text = '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.outputs)
    images = sum('image/png' in o.get('data', {}) for c in nb.cells if c.cell_type == 'code' for o in c.outputs)
    assert images == 2, 'the curves and the predictions should both be drawn'
    assert 'tench' in text, 'the pretrained classes are not listed by name'
    final = dict(re.findall(r'^(fine-tuned|from scratch): val top-1 ([\d.]+)%', text, flags=re.M))
    finetuned, scratch = float(final['fine-tuned']), float(final['from scratch'])
    assert finetuned > scratch, f'fine-tuning ({finetuned}%) did not beat training from scratch ({scratch}%)'
    assert finetuned > 10., f'fine-tuning did not beat chance (10%): {finetuned}%'
