"""Progressive resizing for ``aft-vit train --size-schedule``: small images early in training (cheap epochs, the
coarse features), the evaluation size at the end (so the model finishes at the size it is measured at).

A schedule is a list of ``EPOCH:SIZE`` steps; the train loader is rebuilt at a step. The size of an epoch depends
on nothing but the epoch, so a run resumed mid-schedule trains at the same size as one that never stopped.
"""
from typing import List, Sequence, Tuple

import torch

from .errors import UserInputError

SizeSchedule = List[Tuple[int, int]]  # (first epoch, square image size), epochs increasing from 0


def parse_size_schedule(steps: Sequence[str]) -> SizeSchedule:
    """``['0:128', '30:224']`` -> ``[(0, 128), (30, 224)]``, checked: starts at epoch 0, epochs increase."""
    schedule = []
    for step in steps:
        epoch, sep, size = str(step).partition(':')
        if not sep or not epoch.strip().isdigit() or not size.strip().isdigit() or int(size) <= 0:
            raise UserInputError(f'--size-schedule step {step!r} is not EPOCH:SIZE (e.g. 0:128 30:176 45:224)')
        schedule.append((int(epoch), int(size)))
    epochs = [epoch for epoch, _ in schedule]
    if not schedule or epochs[0] != 0 or any(b <= a for a, b in zip(epochs, epochs[1:])):
        raise UserInputError(f'--size-schedule {" ".join(map(str, steps))}: the first step must be at epoch 0 and '
                             'the epochs must increase (e.g. 0:128 30:176 45:224)')
    return schedule


def size_at(schedule: SizeSchedule, epoch: int) -> int:
    """The training image size of ``epoch``: that of the last step at or before it."""
    return [size for start, size in schedule if start <= epoch][-1]


def check_model_takes_sizes(model: torch.nn.Module, schedule: SizeSchedule, in_chans: int) -> None:
    """Run the model once at every size of the schedule, so a size it cannot take fails now with a clear message
    rather than hours into training. Eval mode and no gradients: no weight, statistic or random state changes."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for _, size in schedule:
                try:
                    model(torch.zeros(1, in_chans, size, size, device=device))
                except (RuntimeError, ValueError, AssertionError) as e:
                    raise UserInputError(
                        f'--size-schedule: the model cannot take {size}x{size} images ({str(e).splitlines()[0]}); '
                        'use sizes it takes (AFT-conv: multiples of its patch size), or for a model with a position '
                        'embedding add --model-kwargs dynamic_img_size=True') from None
    finally:
        model.train(was_training)
