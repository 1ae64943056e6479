"""augment=affine: random affine transforms of the training images, a different one for each image in each step, on
the batch's device. ImageDataModule applies it to training batches only, with a generator drawn for each batch from
the run's seed (seeds.py), so that a resumed run sees the transforms that one never stopped would have seen."""

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

Augmentation = Callable[[Tensor, torch.Generator | None], Tensor]  # (images, generator) -> transformed images


class AffineDraw(NamedTuple):
    """One transform per image: counter-clockwise angles in degrees, scale factors, and shifts in pixels (x right, y
    down), each n long (shifts n x 2)."""

    angles: Tensor
    scales: Tensor
    shifts: Tensor


class Affine:
    """Each image rotated about its centre by an angle in [-degrees, degrees], scaled by a factor in [1 - scale,
    1 + scale] and shifted by up to `shift` pixels along each axis, each drawn uniformly and independently; bilinear
    resampling, with zeros (the background) where the transform brings in pixels from outside the image. Zero ranges
    give the images unchanged. (torchvision.transforms.v2.RandomAffine draws one transform per call, so per batch.)"""

    def __init__(self, shift: float = 0.0, degrees: float = 0.0, scale: float = 0.0):
        self.shift, self.degrees, self.scale = shift, degrees, scale  # ranges: config.AffineConfig

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The images moved, each by a transform drawn from `generator` (None: torch's global one of their device)."""
        return affine(images, self.draw(len(images), generator, images.device))

    def draw(self, n: int, generator: torch.Generator | None = None, device: torch.device | None = None) -> AffineDraw:
        device = generator.device if generator is not None else device

        def uniform(half_width: float, *shape: int) -> Tensor:  # in [-half_width, half_width]
            u = torch.rand(n, *shape, generator=generator, device=device)
            return (2 * u - 1) * half_width

        return AffineDraw(uniform(self.degrees), 1 + uniform(self.scale), uniform(self.shift, 2))


def affine(images: Tensor, draw: AffineDraw) -> Tensor:
    """`images` (N x C x H x W, float) each moved by its transform of `draw`: the output pixel at p (pixel units about
    the centre) takes the input at R⁻¹(p - shift) / scale, which grid_sample reads in coordinates normalised to [-1, 1]
    (half the width and height: D below)."""
    n, _, height, width = images.shape
    angles = draw.angles.to(images) * (math.pi / 180)
    cos, sin = torch.cos(angles), torch.sin(angles)
    # R⁻¹ for a counter-clockwise turn on screen, where y points down: [[cos, -sin], [sin, cos]]
    inverse = (
        torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        / draw.scales.to(images)[:, None, None]
    )
    half = torch.tensor([width / 2, height / 2], dtype=images.dtype, device=images.device)  # D
    linear = inverse * half[None, None, :] / half[None, :, None]  # D⁻¹ R⁻¹ D / scale
    offset = -(inverse @ draw.shifts.to(images)[:, :, None])[:, :, 0] / half  # -D⁻¹ R⁻¹ shift / scale
    theta = torch.cat([linear, offset[:, :, None]], dim=2)
    grid = F.affine_grid(theta, [n, 1, height, width], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
