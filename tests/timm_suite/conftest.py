"""Run timm's model suite (prepared by prepare.py) over the aft models only.

The suite parametrizes every test over all of timm's models; here only the
parametrizations whose ``model_name`` is one of ours are kept. Tests with no
``model_name`` parameter, or pinned to timm's own models, are about timm, not us.
"""
import timm

import aft_vit  # noqa: F401  registers the aft_* models before collection

AFT_MODELS = set(timm.list_models(module='aft_vision_transformer'))


def _is_aft_item(item) -> bool:
    callspec = getattr(item, 'callspec', None)
    if callspec is None:
        return False
    name = callspec.params.get('model_name')
    if item.originalname == 'test_model_load_pretrained':
        # downloads from huggingface.co, which tests must never need; tests/test_hub.py loads every published tag
        # with the same timm.create_model(tag, pretrained=True) call from a Hub server on 127.0.0.1
        return False
    return isinstance(name, str) and name.split('.')[0] in AFT_MODELS


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        in_suite = item.path.name == 'test_models.py' and item.path.parent.name == 'timm_suite'
        (keep if not in_suite or _is_aft_item(item) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
