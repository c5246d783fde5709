"""Training-step speed at the shapes the CPU-budget recipes train: AFT-conv tiny against DeiT-tiny.

    python benchmarks/recipe_training.py [--rounds 5] [--update-readme]

CIFAR-10: 32 px, 4 px patches, batch 128; Imagenette: 128 px, 16 px patches, batch 64 (both 64 tokens,
10 classes), AdamW as in `recipes/*/*.cpu-budget.yaml`, in bfloat16 autocast (the recipes' `amp: true`) and in
float32: which is faster depends on the processor. Model steps only (random images, no data loading),
interleaved rounds, median. These are the numbers that decide how many epochs a CPU session trains.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from aft_vit.machine import machine_description

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import markdown_table, update_readme  # noqa: E402

SHAPES = [('cifar10', 32, 4, 128), ('imagenette', 128, 16, 64)]
PRECISIONS = ('bfloat16 autocast', 'float32')  # which is faster depends on the processor (AMX, AVX512-BF16, none)
MODELS = {'aft_conv_tiny': 'aft_conv_tiny', 'deit_tiny': 'vit_tiny_patch16_224'}


def _step(name: str, res: int, patch: int, batch: int, amp: bool):
    import timm
    import aft_vit  # noqa: F401
    model = timm.create_model(name, img_size=res, patch_size=patch, num_classes=10).train()
    optimizer = torch.optim.AdamW(model.parameters())
    images, targets = torch.randn(batch, 3, res, res), torch.randint(0, 10, (batch,))

    def step():
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--update-readme', action='store_true')
    args = parser.parse_args()
    rows = []
    for (data, res, patch, batch), precision in [(shape, p) for shape in SHAPES for p in PRECISIONS]:
        amp = precision == 'bfloat16 autocast'
        steps = {label: _step(name, res, patch, batch, amp) for label, name in MODELS.items()}
        for step in steps.values():
            step()
            step()
        times = {label: [] for label in steps}
        for _ in range(args.rounds):
            for label, step in steps.items():
                start = time.perf_counter()
                step()
                times[label].append(time.perf_counter() - start)
        rate = {label: batch / statistics.median(ts) for label, ts in times.items()}
        rows.append({'data': data, 'input': f'{res} px / {patch} px patches', 'batch': batch, 'precision': precision,
                     'aft_conv_tiny img/s': f'{rate["aft_conv_tiny"]:.1f}', 'deit_tiny img/s': f'{rate["deit_tiny"]:.1f}',
                     'speed ratio': f'{rate["aft_conv_tiny"] / rate["deit_tiny"]:.2f}'})
        print(rows[-1], flush=True)
    command = 'python ' + ' '.join(['benchmarks/recipe_training.py'] + sys.argv[1:])
    text = f'Machine: {machine_description()}. Command: `{command}`.\n\n' + markdown_table(rows, list(rows[0]))
    print(text)
    if args.update_readme:
        update_readme(text, 'recipe-training')


if __name__ == '__main__':
    main()
