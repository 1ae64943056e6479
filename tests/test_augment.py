"""augment=affine: one random affine transform per training image and step, drawn from the run's seed."""

from types import SimpleNamespace

import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from autoencoders.data import ImageDataModule
from autoencoders.data.augment import Affine, AffineDraw, affine
from autoencoders.data.batches import to_unit_float
from autoencoders.data.sources import MNISTSubset
from tests.helpers import TINY, metrics, run_train


def test_each_image_moves_as_torchvisions_affine_moves_it():
    """torchvision turns clockwise for a positive angle in `affine` (counter-clockwise in `rotate`), so the angle is
    negated; images not square, so that the pixel and normalised coordinates differ in scale along each axis."""
    images = torch.rand(16, 2, 20, 28, generator=torch.Generator().manual_seed(0))
    draw = Affine(shift=4, degrees=60, scale=0.3).draw(16, torch.Generator().manual_seed(1))
    moved = affine(images, draw)
    for image, out, angle, scale, shift in zip(images, moved, *draw, strict=True):
        expected = TF.affine(image, angle=-angle.item(), translate=shift.tolist(), scale=scale.item(), shear=[0.0, 0.0],
                             interpolation=InterpolationMode.BILINEAR)  # fmt: skip
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(moved, images, atol=0.1)


def test_zero_ranges_leave_the_images_unchanged():
    images = torch.rand(8, 1, 28, 28)
    torch.testing.assert_close(Affine()(images, torch.Generator().manual_seed(0)), images, atol=1e-5, rtol=0)


def test_the_draws_stay_within_their_ranges_and_fill_them():
    angles, scales, shifts = Affine(shift=2, degrees=10, scale=0.1).draw(20_000, torch.Generator().manual_seed(0))
    for values, low, high in [(angles, -10, 10), (scales, 0.9, 1.1), (shifts, -2, 2)]:
        assert low <= values.min() < low + 0.01 and high - 0.01 < values.max() <= high
        assert abs(values.mean() - (low + high) / 2) < 0.02 * (high - low)
    assert abs(torch.corrcoef(shifts.T)[0, 1]) < 0.03  # x and y drawn apart


def test_a_turn_moves_a_bright_bar_to_its_angle():
    """An independent check of the direction: a horizontal bar turned by 30 degrees counter-clockwise on screen
    (y pointing down) has its principal axis at -30 degrees in pixel coordinates."""
    image = torch.zeros(1, 1, 29, 29)
    image[0, 0, 14, 4:25] = 1
    turned = affine(image, AffineDraw(torch.tensor([30.0]), torch.ones(1), torch.zeros(1, 2)))[0, 0]
    y, x = torch.meshgrid(torch.arange(29.0), torch.arange(29.0), indexing="ij")
    w = turned / turned.sum()
    cx, cy = (w * x).sum(), (w * y).sum()
    cov_xy, var_x, var_y = (w * (x - cx) * (y - cy)).sum(), (w * (x - cx) ** 2).sum(), (w * (y - cy) ** 2).sum()
    axis = 0.5 * torch.atan2(2 * cov_xy, var_x - var_y)
    assert torch.rad2deg(axis).item() == pytest.approx(-30, abs=1)


def test_only_training_batches_are_augmented_each_the_same_whenever_it_is_trained(tmp_path):
    dm = ImageDataModule(MNISTSubset(tmp_path), seed=3, augment=Affine(shift=2, degrees=10, scale=0.1))
    dm.setup()
    progress = SimpleNamespace(completed=0)  # the trainer's count of the epoch's trained batches
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(current=progress)))
    dm.trainer = SimpleNamespace(training=False, current_epoch=0, global_rank=0, fit_loop=loop)
    batch = dm.train_set.images[:32]
    assert torch.equal(dm.on_after_batch_transfer((batch, None), 0)[0], to_unit_float(batch))  # val, test, predict
    dm.trainer.training = True
    draws = []
    for index in (0, 1, 0):
        progress.completed = index
        draws.append(dm.on_after_batch_transfer((batch, None), 0)[0])
    assert not torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])
    assert not torch.allclose(draws[0], to_unit_float(batch), atol=0.1)
    other_seed = ImageDataModule(MNISTSubset(tmp_path), seed=4, augment=dm.augment)
    other_seed.setup()
    other_seed.trainer = dm.trainer
    assert not torch.equal(other_seed.on_after_batch_transfer((batch, None), 0)[0], draws[0])


@pytest.mark.slow
def test_two_augmented_runs_with_one_seed_are_equal_and_differ_from_one_without(tmp_path):
    runs = {"a": ["augment=affine"], "b": ["augment=affine"], "plain": []}
    for name, overrides in runs.items():
        run_train(*TINY, "model=ae", "latent_dim=2", *overrides, f"hydra.run.dir={name}", cwd=tmp_path)
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b") != metrics(tmp_path / "plain")
