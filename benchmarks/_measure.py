"""Shared measurement helpers for the benchmark scripts: timing medians and peak memory of a fresh process."""
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

from aft_vit.machine import processor_key


def median_seconds(fn: Callable[[], None], repeats: int, inner: int = 1) -> float:
    """Median wall time of ``inner`` calls of ``fn`` over ``repeats`` timed runs, in seconds per call."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def reset_peak_rss() -> None:
    """Reset the kernel's high-water mark of this process's RSS (Linux: /proc/self/clear_refs)."""
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')


def peak_rss_mib() -> float:
    """Peak RSS (VmHWM) of this process since the last reset, in MiB."""
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) / 1024
    raise RuntimeError('no VmHWM in /proc/self/status')


def rss_mib() -> float:
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
    raise RuntimeError('no VmRSS in /proc/self/status')


# glibc serves an allocation this large or larger with its own mmap and unmaps it on free. Its default threshold
# moves up (to 32 MiB) after the first large free, after which freed tensors stay in the heap and count in RSS until
# the heap's top is trimmed: the high-water mark then measured allocation history more than live tensors (three runs
# of one child, DeiT-tiny at 896 px, batch 2: 105, 123 and 128 MiB). Fixed at 64 KiB: 69.5 to 69.6 MiB.
MMAP_THRESHOLD_BYTES = 64 * 1024


def run_isolated(script: Path, args: Dict[str, object], measures_memory: bool) -> Dict[str, float]:
    """Run ``script --child JSON`` in a fresh interpreter and return the JSON it prints last.

    A child that ``measures_memory`` has its allocator serve every tensor of 64 KiB or more straight from mmap
    (``MALLOC_MMAP_THRESHOLD_``), so that its peak RSS follows the memory its tensors hold. Not for timing: every
    such allocation then costs fresh pages (AFT-conv's operator at 256 tokens ran 2x slower).
    """
    env = dict(os.environ)
    if measures_memory:
        env['MALLOC_MMAP_THRESHOLD_'] = str(MMAP_THRESHOLD_BYTES)
    result = subprocess.run([sys.executable, str(script), '--child', json.dumps(args)], capture_output=True,
                            text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f'{script.name} child failed for {args}:\n{result.stderr[-2000:]}')
    return json.loads(result.stdout.strip().splitlines()[-1])


def markdown_table(rows: List[Dict[str, object]], columns: List[str]) -> str:
    lines = ['| ' + ' | '.join(columns) + ' |', '| ' + ' | '.join('---' for _ in columns) + ' |']
    for row in rows:
        lines.append('| ' + ' | '.join(str(row.get(c, '')) for c in columns) + ' |')
    return '\n'.join(lines)


README = Path(__file__).with_name('README.md')


def update_readme(text: str, section: str) -> None:
    """Write ``text`` as this processor family's table of ``section`` in benchmarks/README.md.

    Each family (:func:`aft_vit.machine.processor_key`) keeps its own block, ``<!-- section:family:start -->`` to
    ``<!-- section:family:end -->``: a run replaces its own family's table and leaves the others'. A family's
    first table goes after the section's last block (or at the end of the file).
    """
    name = f'{section}:{processor_key()}'
    start, end = f'<!-- {name}:start -->', f'<!-- {name}:end -->'
    current = README.read_text() if README.exists() else ''
    block = f'{start}\n{text}\n{end}'
    if start in current:
        current = current[:current.index(start)] + block + current[current.index(end) + len(end):]
    else:
        ends = list(re.finditer(rf'<!-- {re.escape(section)}:[a-z0-9-]+:end -->', current))
        if ends:
            at = ends[-1].end()
            current = current[:at] + f'\n\n{block}' + current[at:]
        else:
            current += f'\n{block}\n'
    README.write_text(current)
