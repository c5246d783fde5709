"""``--device-data``: images decoded once and augmented per batch on the device, checked against PIL and geometry."""
import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_dataset

from aft_vit.device_data import DeviceResidentLoader, decode_dataset
from aft_vit.errors import UserInputError
from aft_vit.train import parse_args
from tests.test_training import _aft_vit, _assert_same_run, _summary, _train_killed_after_its_first_epoch, small_model

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616)


@pytest.fixture(scope='module')
def decoded(cifar_tiny):
    dataset = create_dataset('', root=str(cifar_tiny / 'train'), is_training=True)
    files = [path for path, _ in dataset.reader.samples]
    return (*decode_dataset(dataset, (32, 32), workers=2), files, dataset.reader.samples)


def _loader(images, targets, **kwargs):
    options = dict(batch_size=16, output_size=(32, 32), mean=MEAN, std=STD, interpolation='bilinear')
    return DeviceResidentLoader(images, targets, **{**options, **kwargs})


def _normalized(images: torch.Tensor) -> torch.Tensor:
    return (images.double() / 255 - torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        STD, dtype=torch.float64).view(1, 3, 1, 1)


def test_decoding_matches_pil_image_by_image(decoded):
    images, targets, files, samples = decoded
    assert images.shape == (320, 3, 32, 32) and images.dtype == torch.uint8
    assert targets.tolist() == [target for _, target in samples]
    for i in (0, 57, 319):
        expected = np.array(Image.open(files[i]).convert("RGB"))
        assert torch.equal(images[i].permute(1, 2, 0), torch.from_numpy(expected))


@pytest.mark.parametrize('mode', ['bilinear', 'bicubic', 'nearest'])
def test_full_image_crop_returns_the_normalized_image_and_its_mirror(decoded, mode):
    images, targets = decoded[:2]
    batch = images[:8]
    plain = _loader(images, targets, scale=(1, 1), ratio=(1, 1), hflip=0., interpolation=mode).augment(batch)
    mirrored = _loader(images, targets, scale=(1, 1), ratio=(1, 1), hflip=1., interpolation=mode).augment(batch)
    torch.testing.assert_close(plain.double(), _normalized(batch), atol=1e-4, rtol=0)
    torch.testing.assert_close(mirrored.double(), _normalized(batch.flip(-1)), atol=1e-4, rtol=0)


def test_quarter_area_crops_are_windows_of_half_the_side_spread_over_the_image(decoded):
    """Area 1/4, aspect 1, sampled nearest at 16 px: each output is a 16 x 16 window of its image, at some offset."""
    images, targets = decoded[:2]
    torch.manual_seed(0)
    batch = images[:64]
    crops = _loader(images, targets, output_size=(16, 16), scale=(.25, .25), ratio=(1, 1), hflip=0.,
                    interpolation='nearest').augment(batch)
    pixels = (crops.double() * torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
              + torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)) * 255
    offsets = []
    for image, crop in zip(batch.double(), pixels):
        windows = image.unfold(1, 16, 1).unfold(2, 16, 1)  # (3, 17, 17, 16, 16): every 16 x 16 window
        error = (windows - crop[:, None, None]).abs().amax(dim=(0, 3, 4))
        assert error.min() < 1e-3, 'the crop is no 16 x 16 window of its image'
        offsets.append(divmod(int(error.argmin()), 17))
    tops, lefts = zip(*offsets)
    assert min(tops) <= 3 and max(tops) >= 13 and min(lefts) <= 3 and max(lefts) >= 13


def test_a_resized_loader_draws_batches_of_its_own_size_from_the_same_images(decoded):
    images, targets = decoded[:2]
    loader = _loader(images, targets)
    small = loader.resized(16)
    assert next(iter(small))[0].shape == (16, 3, 16, 16) and next(iter(loader))[0].shape == (16, 3, 32, 32)
    assert small.images is loader.images and len(small) == len(loader) == 20


def test_epochs_are_permutations_shared_by_ranks_which_split_them(decoded):
    images, targets = decoded[:2]
    ranks = [_loader(images, targets.clone(), rank=r, world_size=2, seed=3) for r in (0, 1)]
    for epoch in (0, 1):
        seen = []
        for loader in ranks:
            loader.sampler.set_epoch(epoch)
            seen.append(torch.cat([target for _, target in loader]))
        assert len(ranks[0]) == 320 // 2 // 16
        orders = [torch.tensor(list(loader.sampler)) for loader in ranks]
        assert not set(orders[0].tolist()) & set(orders[1].tolist())
        assert sorted(orders[0].tolist() + orders[1].tolist()) == list(range(320))
        assert torch.equal(seen[0], targets[orders[0]])
    torch.manual_seed(5)
    first = [x for x, _ in ranks[0]]
    torch.manual_seed(5)
    again = [x for x, _ in ranks[0]]
    assert all(torch.equal(a, b) for a, b in zip(first, again)), 'the same seed must draw the same crops'


@pytest.mark.parametrize('flags, named', [
    ([], '--color-jitter 0.4'),
    (['--color-jitter', '0', '--aa', 'rand-m9-mstd0.5'], '--aa rand-m9-mstd0.5'),
])
def test_per_image_augmentations_it_cannot_apply_are_refused(tmp_path, flags, named):
    with pytest.raises(UserInputError, match=named.replace('.', r'\.')):
        parse_args(['--data-dir', str(tmp_path), '--device-data', *flags])


DEVICE_ARGS = [*small_model(2), '-b', 32, '--epochs', 2, '--warmup-epochs', 1, '--lr', 1e-3, '--device-data',
               '--color-jitter', 0, '--reprob', 0.25, '--mixup', 0.8, '--cutmix', 1.0, '--train-interpolation',
               'bicubic', '--val-split', 'test', '--no-progress', '-j', 2]


def test_training_on_device_data_resumes_exactly(cifar_tiny, tmp_path):
    """2 epochs straight == 1 epoch, killed after its checkpoint, then --resume; the loss is finite and evaluated."""
    _aft_vit('train', '--data-dir', cifar_tiny, *DEVICE_ARGS, '--output', tmp_path, '--experiment', 'straight')
    rows = _summary(tmp_path / 'straight')
    assert all(np.isfinite(float(row['train_loss'])) and float(row['eval_top1']) >= 0 for row in rows)
    run = _train_killed_after_its_first_epoch(['--data-dir', cifar_tiny, *DEVICE_ARGS], tmp_path / 'killed')
    _aft_vit('train', '--data-dir', cifar_tiny, *DEVICE_ARGS, '--output', tmp_path, '--experiment', 'killed',
             '--resume', run / 'last.pth.tar')
    _assert_same_run(tmp_path / 'straight', run, ('state_dict',))
