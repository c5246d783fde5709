"""Shared test setup: make sure timm's model suite for the installed timm version is in place."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def pytest_configure(config):
    from tests.timm_suite.prepare import prepare
    prepare()
