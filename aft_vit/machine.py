"""What a run ran on, in one line: speed (and so a training run's wall time) depends on the processor's vector
extensions, so every benchmark table, training checkpoint and model card names them."""
import functools
import re
from pathlib import Path
from typing import Dict, Set

import torch


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> Dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ('model name', 'flags', ...), read once per process: they do
    not change while it runs. Empty where there is no such file."""
    fields: Dict[str, str] = {}
    try:
        text = Path('/proc/cpuinfo').read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            break  # the end of the first processor's block
        key, _, value = line.partition(':')
        fields.setdefault(key.strip(), value.strip())
    return fields


def _processor_name() -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return _cpuinfo().get('model name') or 'unknown CPU'


def processor_key() -> str:
    """A short slug of the processor family, e.g. 'intel-xeon', 'amd-epyc', or 'amd-epyc-no-avx512' for a CPU
    of that name without AVX512: benchmark tables are kept one per family, since their speed ratios differ, and
    machines sold under one name differ in their vector units, which move those ratios most."""
    name = re.sub(r'\((R|TM|r|tm)\)', ' ', _processor_name())
    words = re.findall(r'[A-Za-z0-9]+', name)
    key = '-'.join(w.lower() for w in words[:2]) or 'unknown'
    if not torch.cuda.is_available() and 'avx512f' not in _cpu_flags():
        key += '-no-avx512'
    return key


def _cpu_flags() -> Set[str]:
    """The CPU's feature flags ('avx512f', 'amx_tile', ...), which decide which kernels run fast."""
    return set(_cpuinfo().get('flags', '').split())


def machine_description() -> str:
    """The processor model (or GPU), the vector extensions that decide CPU speed ratios, and the thread count."""
    if torch.cuda.is_available():
        return f'{_processor_name()} (torch {torch.__version__})'
    flags = _cpu_flags()
    isa = [name for flag, name in (('avx512f', 'AVX512'), ('avx512_bf16', 'AVX512-BF16'), ('amx_tile', 'AMX'))
           if flag in flags] or ['no AVX512']
    return f'{_processor_name()} ({", ".join(isa)}), {torch.get_num_threads()} threads (torch {torch.__version__})'
