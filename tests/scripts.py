"""The repository's scripts (results/*.py, recipes/*/*.py: not part of the package) loaded as modules for tests."""
import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_script(relative_path: str) -> ModuleType:
    """The script at ``ROOT / relative_path``, executed as a fresh module (its ``__main__`` block does not run)."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
