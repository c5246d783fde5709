"""Shared test setup: make sure timm's model suite for the installed timm version is in place."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def pytest_configure(config):
    from tests.timm_suite.prepare import prepare
    prepare()


import zipfile  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / 'shared' / 'data'


def extract_subset(zip_name: str, out_dir: Path, per_class: dict) -> Path:
    """Extract the first ``per_class[split]`` images of every class of each split from a shared data zip."""
    archive = SHARED_DATA / zip_name
    if not archive.is_file():
        raise FileNotFoundError(f'{archive} is missing: the tests need ../shared/data (see its README.md)')
    with zipfile.ZipFile(archive) as zf:
        names = sorted(n for n in zf.namelist() if not n.endswith('/'))
        root = names[0].split('/')[0]
        taken = {}
        for name in names:
            parts = name.split('/')
            if len(parts) != 4 or parts[1] not in per_class:
                continue
            key = (parts[1], parts[2])
            if taken.get(key, 0) < per_class[parts[1]]:
                taken[key] = taken.get(key, 0) + 1
                zf.extract(name, out_dir)
    return out_dir / root


@pytest.fixture(scope='session')
def cifar_small(tmp_path_factory) -> Path:
    """CIFAR-10 (JPEG q75 copy): 200 train and 50 test images per class."""
    return extract_subset('cifar10-jpg.zip', tmp_path_factory.mktemp('cifar_small'), {'train': 200, 'test': 50})


@pytest.fixture(scope='session')
def cifar_tiny(tmp_path_factory) -> Path:
    """CIFAR-10 (JPEG q75 copy): 32 train and 10 test images per class."""
    return extract_subset('cifar10-jpg.zip', tmp_path_factory.mktemp('cifar_tiny'), {'train': 32, 'test': 10})
