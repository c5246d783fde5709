"""What a native kernel would gain: aft_conv_tiny at batch 1 with its banded product fused in C++ (an unshipped
prototype, benchmarks/fused_band.cpp) against the package's pure-PyTorch path and DeiT-tiny, in one process.

    python benchmarks/fused_band.py [--rounds 11] [--update-readme]

The package is pure Python (timm's way); at batch 1 aft_conv_tiny's mixing is ~20 small tensor operations a block,
whose passes over memory cost more than its arithmetic. This measures how much of the gap to DeiT a fused loop closes,
for the decision whether to ship one. Needs a C++ compiler and ninja (torch.utils.cpp_extension builds the prototype
with -march=native, under ~/.cache/torch_extensions). Before anything is timed, the prototype's output is checked
against the package's banded product in float64 (tested against tests/reference.py in tests/test_band.py) and the
model's against the shipped model's. Rounds interleave DeiT-tiny (twice), aft_conv_tiny as
shipped and aft_conv_tiny with the prototype swapped in, in a rotating order; medians over the rounds.
"""
import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch

from aft_vit.machine import _cpu_flags, machine_description

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import markdown_table, update_readme  # noqa: E402

LANES = 16  # the prototype's padded query row (fused_band.cpp, kLanes)


def build_prototype() -> Callable[..., torch.Tensor]:
    """Compile fused_band.cpp and return ``band(q, k, v, weights)`` with aft_conv2d_band's arguments."""
    from torch.utils.cpp_extension import load
    # -march=native: one build per instruction set, so that a cache shared between machines never serves another's
    flags = hashlib.sha1(' '.join(sorted(_cpu_flags())).encode()).hexdigest()[:10]
    module = load(f'aft_vit_fused_band_{flags}', [str(Path(__file__).with_name('fused_band.cpp'))],
                  extra_cflags=['-O3', '-march=native', '-ffast-math', '-fopenmp'], extra_ldflags=['-fopenmp'])
    # per band-weights tensor (the mixers keep theirs), held with it so that its id is not reused: transposed, padded
    padded: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def band(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if id(weights) not in padded:
            columns = torch.nn.functional.pad(weights.transpose(1, 2), (0, LANES - weights.shape[1])).contiguous()
            padded[id(weights)] = (weights, columns)
        return module.band_fused(q.contiguous(), k.contiguous(), v.contiguous(), padded[id(weights)][1])
    return band


def check_prototype(band: Callable[..., torch.Tensor]) -> float:
    """The prototype against aft_conv2d_band in float64 on keys of a wide range; raises if it disagrees beyond float32
    rounding. Returns the largest error relative to the output's magnitude."""
    from aft_vit.layers.band import aft_conv2d_band, conv_band_weights
    gen = torch.Generator().manual_seed(0)
    q, v = torch.randn(192, 1, 14, 14, generator=gen), torch.randn(192, 1, 14, 14, generator=gen)
    k = torch.randn(32, 1, 14, 14, generator=gen) * 8
    weights = conv_band_weights(torch.randn(32, 11, 11, generator=gen) * 3, 14, 14)
    expected = aft_conv2d_band(q.double(), k.double(), v.double(), weights.double())
    error = ((band(q, k, v, weights).double() - expected).abs().max() / expected.abs().max()).item()
    if not error < 1e-5:
        raise RuntimeError(f'fused_band prototype disagrees with aft_conv2d_band: relative error {error:.2e}')
    return error


def measure(band: Callable[..., torch.Tensor], rounds: int, forwards: int = 30) -> Dict[str, float]:
    """Median ms a batch-1 forward of each variant over ``rounds`` interleaved rounds."""
    import timm
    import aft_vit  # noqa: F401  (registers the AFT models)
    import aft_vit.layers.reuse as reuse
    shipped = reuse.aft_conv2d_band
    deit, aft = timm.create_model('deit_tiny_patch16_224').eval(), timm.create_model('aft_conv_tiny').eval()
    variants = {'deit_tiny (1)': (deit, shipped), 'aft_conv_tiny': (aft, shipped),
                'aft_conv_tiny, fused': (aft, band), 'deit_tiny (2)': (deit, shipped)}
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    times = {name: [] for name in variants}
    names = list(variants)
    try:
        with torch.inference_mode():
            reuse.aft_conv2d_band = band
            fused_out = aft(x)
            reuse.aft_conv2d_band = shipped
            if not torch.allclose(fused_out, aft(x), rtol=1e-4, atol=1e-4):
                raise RuntimeError('aft_conv_tiny with the prototype disagrees with the shipped path')
            for round_index in range(rounds):
                for name in names[round_index % 4:] + names[:round_index % 4]:
                    model, reuse.aft_conv2d_band = variants[name]
                    for _ in range(5):
                        model(x)
                    start = time.perf_counter()
                    for _ in range(forwards):
                        model(x)
                    times[name].append((time.perf_counter() - start) / forwards * 1e3)
    finally:
        reuse.aft_conv2d_band = shipped
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--rounds', type=int, default=11)
    parser.add_argument('--update-readme', action='store_true')
    args = parser.parse_args()
    start = time.perf_counter()
    band = build_prototype()
    built = time.perf_counter() - start
    error = check_prototype(band)
    medians = measure(band, args.rounds)
    deit = statistics.mean([medians['deit_tiny (1)'], medians['deit_tiny (2)']])
    rows = [{'model': name, 'ms / forward': f'{ms:.2f}', 'DeiT / model': f'{deit / ms:.3f}'}
            for name, ms in medians.items()]
    command = 'python benchmarks/fused_band.py' + ('' if args.rounds == 11 else f' --rounds {args.rounds}')
    text = (f'Machine: {machine_description()}. Command: `{command}`. Batch 1, 224 px, inference; median ms a forward '
            f'over {args.rounds} interleaved rounds of 30; \'DeiT / model\' against the mean of the two DeiT-tiny '
            f'rows. Prototype built (or loaded from torch\'s extension cache) in {built:.0f} s; its largest error '
            f'against the float64 banded product '
            f'{error:.1e} of the output\'s magnitude.\n\n' + markdown_table(rows, list(rows[0])))
    print(text)
    if args.update_readme:
        update_readme(text, 'fused_band')


if __name__ == '__main__':
    main()
