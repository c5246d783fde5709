"""Training images decoded once, kept on the training device and augmented there (``aft-vit train --device-data``).

A small model on a GPU trains faster than CPU loader workers can decode and crop images: on a lent H200 with 14
workers, aft_conv_tiny_stem4_32 on CIFAR-10 ran at ~4.4k img/s, bound by the loader, and compiling the model did not
change the rate. Small data sets fit on the device as uint8 (CIFAR-10's 50,000 training images take 150 MB), so here
every image is decoded once and each batch is cropped, flipped, resized and normalized in a few batched operations.

The crops follow timm's random-resized crop (area fraction from ``scale``, log-uniform aspect from ``ratio``,
uniform position), drawn per image from torch's RNG, which ``aft-vit train`` reseeds every epoch, so resume stays
exact. Where a drawn crop does not fit, its sides are clipped to the image instead of redrawn (torchvision redraws
up to ten times). Resampling is ``grid_sample`` without antialiasing: meant for images about the training size
(CIFAR-10), not for shrinking large photos. Per-image photometric augmentation (colour jitter, RandAugment) has no
batched form here; mixup / cutmix and random erasing run on the batch with timm's ``Mixup`` and ``RandomErasing``.
"""
import argparse
import copy
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DistributedSampler

from .data import training_interpolation
from .errors import UserInputError

_RESAMPLING = ('bilinear', 'bicubic', 'nearest')  # grid_sample's modes


def decode_dataset(dataset, size: Tuple[int, int], workers: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every image of a timm ``ImageDataset`` as one (N, 3, H, W) uint8 tensor, resized to ``size`` where it differs,
    and the (N,) int64 targets. The dataset's transform is cleared (set to None), so items come back as PIL images."""
    dataset.transform = None

    def load(index: int) -> Tuple[np.ndarray, int]:
        image, target = dataset[index]
        if image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), Image.BICUBIC)
        return np.asarray(image.convert('RGB')), int(target)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # PIL decodes without holding the GIL
        items = list(pool.map(load, range(len(dataset)), chunksize=256))
    images = torch.from_numpy(np.stack([image for image, _ in items])).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor([target for _, target in items], dtype=torch.int64)


class DeviceResidentLoader:
    """Batches of (normalized images, targets) like timm's training loader, drawn from uint8 images held on a device.

    One epoch is a permutation from ``sampler`` (a ``DistributedSampler``: the same permutation on every rank,
    which keeps its own share; ``set_epoch`` reseeds it), cut into full batches as timm's training loader does.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, batch_size: int, output_size: Sequence[int],
                 mean: Sequence[float], std: Sequence[float], scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3. / 4., 4. / 3.), hflip: float = 0.5, vflip: float = 0.,
                 interpolation: str = 'bilinear', random_erasing: Optional[RandomErasing] = None,
                 rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        if interpolation not in _RESAMPLING and interpolation != 'random':
            raise UserInputError(f'--device-data resamples with {", ".join(_RESAMPLING)} or random, '
                                 f'not {interpolation!r}: set --train-interpolation to one of them')
        self.images, self.targets = images, targets.to(images.device)
        self.batch_size = batch_size
        self.output_size = (int(output_size[-2]), int(output_size[-1]))
        self.mean = torch.tensor(mean, device=images.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=images.device).view(1, -1, 1, 1) * 255
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.hflip, self.vflip = hflip, vflip
        self.interpolation = interpolation
        self.random_erasing = random_erasing
        self.sampler = DistributedSampler(range(len(images)), num_replicas=world_size, rank=rank, shuffle=True,
                                          seed=seed, drop_last=True)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def resized(self, size: int) -> 'DeviceResidentLoader':
        """The same loader producing ``size`` x ``size`` batches (progressive resizing)."""
        other = copy.copy(self)  # shares the images, the sampler and the erasing
        other.output_size = (size, size)
        return other

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(list(self.sampler), dtype=torch.int64, device=self.images.device)
        for step in range(len(self)):
            index = order[step * self.batch_size:(step + 1) * self.batch_size]
            yield self.augment(self.images[index]), self.targets[index]

    def _crop_transforms(self, n: int, height: int, width: int, device: torch.device) -> torch.Tensor:
        """(n, 2, 3) affine maps from output to input coordinates in [-1, 1]: one random-resized crop (and flips)
        per image."""
        area = torch.empty(n, device=device).uniform_(*self.scale)
        aspect = torch.empty(n, device=device).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1])).exp()
        crop_w = (area * aspect * height / width).sqrt().clamp(max=1.)  # fractions of the image's sides
        crop_h = (area / aspect * width / height).sqrt().clamp(max=1.)
        centre_x = (torch.rand(n, device=device) * 2 - 1) * (1 - crop_w)
        centre_y = (torch.rand(n, device=device) * 2 - 1) * (1 - crop_h)
        flip_x = torch.where(torch.rand(n, device=device) < self.hflip, -1., 1.)
        flip_y = torch.where(torch.rand(n, device=device) < self.vflip, -1., 1.)
        theta = torch.zeros(n, 2, 3, device=device)
        theta[:, 0, 0], theta[:, 0, 2] = crop_w * flip_x, centre_x
        theta[:, 1, 1], theta[:, 1, 2] = crop_h * flip_y, centre_y
        return theta

    def augment(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32 (B, C, *output_size): cropped, flipped, resized, normalized, erased."""
        n, channels, height, width = batch.shape
        theta = self._crop_transforms(n, height, width, batch.device)
        grid = F.affine_grid(theta, [n, channels, *self.output_size], align_corners=False)
        mode = self.interpolation
        if mode == 'random':  # timm's 'random' picks bilinear or bicubic; here one draw per batch
            mode = 'bicubic' if torch.rand(()) < 0.5 else 'bilinear'
        images = F.grid_sample(batch.float(), grid, mode=mode, padding_mode='border',
                               align_corners=False)
        images = (images.clamp_(0, 255) - self.mean) / self.std
        if self.random_erasing is not None:
            images = self.random_erasing(images)
        return images


def check_device_data_args(args: argparse.Namespace) -> None:
    """Refuse the augmentations that ``--device-data`` cannot apply, rather than silently skip them."""
    refused = []
    if args.aa:
        refused.append(f'--aa {args.aa}')
    if args.color_jitter:
        refused.append(f'--color-jitter {args.color_jitter} (the default is 0.4: pass --color-jitter 0)')
    if args.aug_repeats:
        refused.append(f'--aug-repeats {args.aug_repeats}')
    if refused:
        raise UserInputError('--device-data crops, flips, mixes (--mixup / --cutmix) and erases (--reprob) on the '
                             'device, but has no per-image ' + ', '.join(refused) + ': drop them or --device-data')


def device_resident_loader(args: argparse.Namespace, dataset, data_config: dict,
                           device: torch.device) -> DeviceResidentLoader:
    """Decode ``dataset`` onto ``device`` at the data config's input size and wrap it with the run's augmentation
    arguments."""
    check_device_data_args(args)
    input_size = data_config['input_size']
    images, targets = decode_dataset(dataset, tuple(input_size[-2:]), args.workers)
    try:
        images = images.to(device)
    except torch.OutOfMemoryError:
        raise UserInputError(f'--device-data: {len(images)} images of {tuple(images.shape[1:])} '
                             f'({images.numel() / 2 ** 30:.1f} GiB as uint8) do not fit on {device}: '
                             f'train without --device-data') from None
    erasing = (RandomErasing(args.reprob, mode=args.remode, max_count=args.recount, device=str(device))
               if args.reprob > 0 and not args.no_aug else None)
    augment = dict(scale=(1., 1.), ratio=(1., 1.), hflip=0., vflip=0.) if args.no_aug else dict(
        scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip)
    return DeviceResidentLoader(images, targets, args.batch_size, input_size, data_config['mean'],
                                data_config['std'], interpolation=training_interpolation(args, data_config),
                                random_erasing=erasing,
                                rank=args.rank, world_size=args.world_size, seed=args.seed, **augment)
