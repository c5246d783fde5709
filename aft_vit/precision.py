"""Which precision trains a model faster on this machine: float32 or bfloat16 / float16 autocast.

The answer depends on the processor, not on the model alone. On the 2-core machines this project trains on, an
AMD EPYC with AVX512-BF16 trains aft_conv_tiny at the CIFAR-10 recipe's shape 1.7x faster under bfloat16 autocast,
while an Intel Xeon with the same flag (and no AMX) trains it 1.5x faster in float32 (benchmarks/README.md,
"Training at the recipes' shapes"). No flag in /proc/cpuinfo tells the two apart, so ``aft-vit train --amp-auto``
times both.
"""
import copy
import statistics
import time
from contextlib import nullcontext
from typing import Callable, Dict, Sequence

import torch


def _pass_timer(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor,
                autocast: Callable) -> Callable[[], float]:
    """A function timing one forward and backward pass (what precision changes; the optimizer step is float32
    either way)."""
    def timed() -> float:
        if images.device.type == 'cuda':
            torch.cuda.synchronize(images.device)
        start = time.perf_counter()
        with autocast():
            loss = torch.nn.functional.cross_entropy(model(images), targets)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if images.device.type == 'cuda':
            torch.cuda.synchronize(images.device)
        return time.perf_counter() - start
    return timed


def time_precisions(model: torch.nn.Module, input_size: Sequence[int], batch_size: int, num_classes: int,
                    amp_dtype: torch.dtype, steps: int = 3) -> Dict[str, float]:
    """Median seconds of a training pass (forward, backward) in float32 and under ``amp_dtype`` autocast.

    Measured on a copy of ``model`` in train mode, on random images of ``input_size`` (C, H, W): the model itself,
    its batch-norm statistics and its gradients are left as they were. One untimed pass of each first (allocation,
    kernel selection), then ``steps`` timed passes of each, interleaved so that a busy machine slows both alike.
    """
    if steps < 1:
        raise ValueError(f'time_precisions: steps must be >= 1, got {steps}')
    trial = copy.deepcopy(model).train()
    device = next(trial.parameters()).device
    images = torch.randn(batch_size, *input_size, device=device)
    targets = torch.randint(0, num_classes, (batch_size,), device=device)
    passes = {
        'float32': _pass_timer(trial, images, targets, nullcontext),
        str(amp_dtype).replace('torch.', ''): _pass_timer(
            trial, images, targets, lambda: torch.autocast(device.type, dtype=amp_dtype)),
    }
    for timed in passes.values():
        timed()
    times: Dict[str, list] = {name: [] for name in passes}
    for _ in range(steps):
        for name, timed in passes.items():
            times[name].append(timed())
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def autocast_is_faster(times: Dict[str, float]) -> bool:
    """Whether the autocast entry of :func:`time_precisions`' result beat float32."""
    autocast_name = next(name for name in times if name != 'float32')
    return times[autocast_name] < times['float32']
