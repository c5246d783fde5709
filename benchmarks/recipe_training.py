"""Training-step speed at the shapes the CPU-budget recipes train: AFT-conv tiny against DeiT-tiny.

    python benchmarks/recipe_training.py [--rounds 5] [--update-readme]

CIFAR-10: 32 px, 4 px patches, batch 128; Imagenette: 128 px, 16 px patches, batch 64 (both 64 tokens,
10 classes), bfloat16 autocast and AdamW as in `recipes/*/*.cpu-budget.yaml`. Model steps only (random
images, no data loading), interleaved rounds, median. These are the numbers that decide how many epochs a
CPU session trains.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine_description, markdown_table, update_readme  # noqa: E402

SHAPES = [('cifar10', 32, 4, 128), ('imagenette', 128, 16, 64)]
MODELS = {'aft_conv_tiny': 'aft_conv_tiny', 'deit_tiny': 'vit_tiny_patch16_224'}


def _step(name: str, res: int, patch: int, batch: int):
    import timm
    import aft_vit  # noqa: F401
    model = timm.create_model(name, img_size=res, patch_size=patch, num_classes=10).train()
    optimizer = torch.optim.AdamW(model.parameters())
    images, targets = torch.randn(batch, 3, res, res), torch.randint(0, 10, (batch,))

    def step():
        with torch.autocast('cpu', dtype=torch.bfloat16):
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
    for data, res, patch, batch in SHAPES:
        steps = {label: _step(name, res, patch, batch) for label, name in MODELS.items()}
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
        rows.append({'data': data, 'input': f'{res} px / {patch} px patches', 'batch': batch,
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
