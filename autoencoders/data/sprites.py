"""dSprites-like images made in code (no download): a white square, ellipse or heart on black, one image per
combination of five discrete factors, as in dSprites (Matthey et al. 2017), whose grid `full=True` reproduces."""

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from autoencoders.data.sources import Source, SourceData
from autoencoders.errors import UserError
from autoencoders.files import save_cache

SHAPES = ("square", "ellipse", "heart")
FACTOR_NAMES = ("shape", "scale", "orientation", "pos_x", "pos_y")
DSPRITES_GRID = {"image_size": 64, "scales": 6, "orientations": 40, "positions": 32}  # 3x6x40x32x32 = 737,280 images
MIN_IMAGE_SIZE = 16  # below it the smallest shapes (a quarter of the image across) are too few pixels to tell apart
RENDER_VERSION = 1  # part of the cache name: bump when the pictures change, so stale caches are not read
_SUPERSAMPLING = 4  # samples per pixel side; a pixel is white when the shape covers at least half of its samples


class SpritesSource(Source):
    """A white shape on black for every combination of the factors shape (square, ellipse, heart), scale (`scales`
    values evenly spaced in [0.5, 1]), orientation (`orientations` angles k * 2pi / orientations, counterclockwise),
    pos_x and pos_y (`positions` values each, left to right and top to bottom); or `num_images` of them drawn with
    `seed`. The label is the shape; `SourceData.factors` holds every image's five value indices.

    The default, 3 x 6 x 8 x 12 x 12 = 20,736 binary 32x32 images, renders in well under a second and is small enough
    for a model to train in minutes on two CPU cores. `full=True` replaces image_size, scales, orientations and
    positions by dSprites' 64x64, 6, 40 and 32: its 737,280 images (3 GB in memory, 0.4 GB cached).

    Geometry: at scale s a shape's smallest enclosing circle has diameter s * (image_size // 2), and its centre moves
    in whole pixels over the middle half of the image (a quarter of the way in at position 0, three quarters at 1), so
    every shape at every position lies inside the image and is the same pixels moved. Each (shape, scale, orientation)
    template is rendered once and copied to every position. Images are uint8 0 or 255 (N x 1 x H x W), cached in
    `cache_dir` under a name that holds every setting they depend on.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike = "~/.cache/autoencoders",
        image_size: int = 32,
        scales: int = 6,
        orientations: int = 8,
        positions: int = 12,
        num_images: int | None = None,
        seed: int = 0,
        full: bool = False,
    ):
        grid = DSPRITES_GRID if full else {
            "image_size": image_size, "scales": scales, "orientations": orientations, "positions": positions
        }  # fmt: skip
        for key, value in grid.items():
            if not _is_count(value):
                raise UserError(
                    f"data.source.{key}={value!r} is not a positive whole number. Set it to e.g. "
                    f"data.source.{key}={DSPRITES_GRID[key]} (dSprites' value), or data.source.full=true for "
                    "dSprites' whole grid."
                )
        self.image_size, self.template_size = grid["image_size"], grid["image_size"] // 2
        if self.image_size < MIN_IMAGE_SIZE:
            raise UserError(
                f"data.source.image_size={self.image_size} is too small for the shapes: the smallest would be "
                f"{self.image_size / 4:.1f} pixels across, too few to tell a square from an ellipse or a heart. "
                f"Use data.source.image_size={MIN_IMAGE_SIZE} or more (32 by default, 64 as in dSprites)."
            )
        room = self.image_size - self.template_size  # the whole pixels that a shape's centre can move across
        if grid["positions"] > room + 1:
            raise UserError(
                f"data.source.positions={grid['positions']} does not fit data.source.image_size={self.image_size}: "
                f"a shape's centre can take only {room + 1} pixel positions along each axis there. Use at most "
                f"data.source.positions={room + 1}, or a larger image_size."
            )
        self.factor_sizes = (len(SHAPES), grid["scales"], grid["orientations"], grid["positions"], grid["positions"])
        grid_size = int(np.prod(self.factor_sizes))
        if num_images is not None and not (_is_count(num_images) and num_images <= grid_size):
            raise UserError(
                f"data.source.num_images={num_images!r} is not a whole number between 1 and the {grid_size:,} images "
                f"of the grid {' x '.join(map(str, self.factor_sizes))} ({', '.join(FACTOR_NAMES)}). Use a number in "
                "that range, or null for the whole grid."
            )
        self.num_images, self.seed = num_images, seed
        self.cache_dir = Path(cache_dir).expanduser()

    @property
    def identity(self) -> str:
        """Every setting the images depend on (the seed only picks the images when num_images subsamples the grid)."""
        grid = "x".join(map(str, self.factor_sizes[1:4]))
        chosen = "all" if self.num_images is None else f"{self.num_images}-seed{self.seed}"
        return f"sprites_{self.image_size}px_{grid}_{chosen}_v{RENDER_VERSION}"

    def load(self) -> SourceData:
        path = self.cache_dir / f"{self.identity}.pt"
        if path.exists():
            cached = torch.load(path, weights_only=True)
            images = np.unpackbits(cached["bits"].numpy(), axis=-1, count=self.image_size)
            images *= 255
            factors = cached["factors"]
        else:
            factors = self._factors()
            images = self._render(factors.numpy())
            bits = np.packbits(images, axis=-1)  # 1 bit per pixel: 1/8 of the bytes on disk
            save_cache({"bits": torch.from_numpy(bits), "factors": factors}, path, "the sprites")
        return SourceData(
            torch.from_numpy(images).unsqueeze(1),
            factors[:, 0].clone(),
            num_classes=len(SHAPES),
            factors=factors,
            factor_names=FACTOR_NAMES,
            factor_sizes=self.factor_sizes,
        )

    def _factors(self) -> Tensor:
        """The value indices (N x 5, int64) of every grid point in order, or of `num_images` drawn with `seed`."""
        grid_size = int(np.prod(self.factor_sizes))
        if self.num_images is None:
            chosen = torch.arange(grid_size)
        else:
            draw = torch.Generator().manual_seed(self.seed)
            chosen = torch.randperm(grid_size, generator=draw)[: self.num_images].sort().values
        return torch.from_numpy(np.stack(np.unravel_index(chosen.numpy(), self.factor_sizes), axis=1)).long()

    def _render(self, factors: np.ndarray) -> np.ndarray:
        """uint8 images (N x H x W) of the factors: each template copied to the images at its position, by position."""
        shapes, scales, orientations, positions, _ = self.factor_sizes
        templates = render_templates(
            self.template_size, _evenly(0.5, 1.0, scales), 2 * np.pi * np.arange(orientations) / orientations
        ).reshape(-1, self.template_size, self.template_size)
        template_of = np.ravel_multi_index(tuple(factors[:, :3].T), (shapes, scales, orientations))
        offsets = np.round(_evenly(0, self.image_size - self.template_size, positions)).astype(int)
        images = np.zeros((len(factors), self.image_size, self.image_size), np.uint8)
        position_of = factors[:, 4] * positions + factors[:, 3]
        order = np.argsort(position_of, kind="stable")
        bounds = np.searchsorted(position_of[order], np.arange(positions**2 + 1))
        t = self.template_size
        for position, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            if start < end:
                at = order[start:end]
                top, left = offsets[position // positions], offsets[position % positions]
                images[at, top : top + t, left : left + t] = templates[template_of[at]]
        return images


def render_templates(size: int, scales: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """uint8 (3 x len(scales) x len(angles) x size x size) 0/255 pictures of each shape centred in a size x size
    square, its smallest enclosing circle of diameter scale * size, turned counterclockwise by each angle."""
    offsets = (np.arange(size * _SUPERSAMPLING) + 0.5) / _SUPERSAMPLING - size / 2  # sample points from the centre
    x, y = offsets[None, :], -offsets[:, None]  # y points up
    radius = scales[:, None, None, None] * size / 2
    cos, sin = np.cos(angles)[None, :, None, None], np.sin(angles)[None, :, None, None]
    u, v = (cos * x + sin * y) / radius, (cos * y - sin * x) / radius  # each sample in the unturned unit shape's frame
    inside = np.stack([_square(u, v), _ellipse(u, v), _heart(u, v)])
    covered = inside.reshape(*inside.shape[:3], size, _SUPERSAMPLING, size, _SUPERSAMPLING).mean(axis=(4, 6))
    return (covered >= 0.5).astype(np.uint8) * np.uint8(255)


# Each shape as an implicit region whose smallest enclosing circle is the unit circle.
def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) <= 2**-0.5


def _ellipse(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u**2 + (2 * v) ** 2 <= 1  # semi-axes 1 and 1/2


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The heart curve (x^2 + y^2 - 1)^3 = x^2 y^3, whose smallest enclosing circle (centre (0, 1/4), radius 5/4: it
    passes through the tip (0, -1) and, to 4 decimals, touches both lobes) is moved and scaled onto the unit circle."""
    x, y = 1.25 * u, 1.25 * v + 0.25
    return (x**2 + y**2 - 1) ** 3 <= x**2 * y**3


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _evenly(low: float, high: float, n: int) -> np.ndarray:
    """n values evenly spaced from low to high; one value: their midpoint."""
    return np.linspace(low, high, n) if n > 1 else np.array([(low + high) / 2])
