"""What a run ran on, in one line: speed (and so a training run's wall time) depends on the processor's vector
extensions, so every benchmark table, training checkpoint and model card names them."""
from pathlib import Path

import torch


def machine_description() -> str:
    """The processor model (or GPU), the vector extensions that decide CPU speed ratios, and the thread count."""
    if torch.cuda.is_available():
        return f'{torch.cuda.get_device_name(0)} (torch {torch.__version__})'
    cpu, flags = 'unknown CPU', set()
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name') and cpu == 'unknown CPU':
                cpu = line.split(':', 1)[1].strip()
            elif line.startswith('flags') and not flags:
                flags = set(line.split(':', 1)[1].split())
    except OSError:
        pass
    isa = [name for flag, name in (('avx512f', 'AVX512'), ('avx512_bf16', 'AVX512-BF16'), ('amx_tile', 'AMX'))
           if flag in flags] or ['no AVX512']
    return f'{cpu} ({", ".join(isa)}), {torch.get_num_threads()} threads (torch {torch.__version__})'
