"""notebooks/finetune_custom_dataset.ipynb runs headless from top to bottom and is committed clean."""
import re
from pathlib import Path

import nbclient
import nbformat

NOTEBOOK = Path(__file__).resolve().parent.parent / 'notebooks' / 'finetune_custom_dataset.ipynb'


def test_committed_notebook_has_no_outputs_or_local_paths():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == 'code':
            assert not cell.outputs and cell.execution_count is None, 'stale outputs are committed'
    text = NOTEBOOK.read_text(encoding='utf-8')
    assert not re.search(r'(/work/|/tmp/|/home/|/root/|[A-Z]:\\\\)', text), 'a path of one machine is committed'


def test_notebook_runs_and_learns():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name='python3',
                            resources={'metadata': {'path': str(NOTEBOOK.parent)}}).execute()
    text = '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.outputs)
    images = sum('image/png' in o.get('data', {}) for c in nb.cells if c.cell_type == 'code' for o in c.outputs)
    assert images == 2, 'the curves and the predictions should both be drawn'
    accuracies = [float(a) for a in re.findall(r'val top-1 ([\d.]+)%', text)]
    assert accuracies and max(accuracies) > 10., f'fine-tuning did not beat chance (10%): {accuracies}'
