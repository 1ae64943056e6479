"""Picture grids of what a trained autoencoder does, at a fixed seed: reconstructions, samples, interpolations and a
latent traversal. Saved as PNG and to TensorBoard."""

import math
from collections.abc import Callable
from pathlib import Path

import torch
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from torchvision.io import encode_png
from torchvision.utils import make_grid, save_image

from autoencoders.data import to_unit_float
from autoencoders.internals import add_summary
from autoencoders.models import AE

ImageSampler = Callable[[int, torch.Generator], Tensor]  # (n, generator) -> n decoded images


@torch.no_grad()
def picture_grids(
    model: AE,
    test_images: Tensor,
    samplers: dict[str, ImageSampler],
    seed: int,
    num_images: int = 16,
    num_samples: int = 64,
    num_pairs: int = 8,
    steps: int = 11,
    traversal_dims: int = 32,
) -> dict[str, Tensor]:
    """Grids named `reconstructions` (test images above their reconstructions), `samples_<sampler>`,
    `interpolations` (one row per pair of test images) and `traversal` (see `latent_traversal`).

    The test images (uint8, as the data module holds them) are drawn at random with `seed`: a split may be ordered
    by class."""
    order = torch.randperm(len(test_images), generator=torch.Generator().manual_seed(seed))
    x = to_unit_float(test_images[order[:num_images]]).to(model.device)
    grids = {"reconstructions": image_grid(torch.cat([x, model.reconstruct(x)]), nrow=len(x))}
    for name, sample in samplers.items():
        images = sample(num_samples, torch.Generator().manual_seed(seed))
        grids[f"samples_{name}"] = image_grid(images, nrow=math.ceil(math.sqrt(num_samples)))
    pairs = to_unit_float(test_images[order[: 2 * min(num_pairs, len(test_images) // 2)]]).to(model.device)
    if len(pairs):
        rows = model.interpolate(pairs[0::2], pairs[1::2], steps)
        grids["interpolations"] = image_grid(rows.flatten(0, 1), nrow=steps)
    grids["traversal"] = image_grid(latent_traversal(model, x[:1], steps, traversal_dims), nrow=steps)
    return grids


def latent_traversal(model: AE, x: Tensor, steps: int, max_dims: int) -> Tensor:
    """Row u decodes the code of the single image `x` with dim u set to `steps` values from -3 to 3, the other dims
    held; one row for each of the first `max_dims` dims."""
    dims = min(model.latent_dim, max_dims)
    z = model.encode(x).repeat(dims, steps, 1)  # (dims, steps, latent_dim)
    index = torch.arange(dims)
    z[index, :, index] = torch.linspace(-3, 3, steps, device=z.device)
    return model.decode(z.flatten(0, 1))


def image_grid(images: Tensor, nrow: int) -> Tensor:
    """make_grid of (N, C, H, W) images, keeping C channels (make_grid copies a grey image into three)."""
    return make_grid(images, nrow=nrow)[: images.shape[1]]


def add_grid(writer: SummaryWriter, tag: str, grid: Tensor, step: int = 0) -> None:
    """`writer.add_image` for an image_grid in [0, 1], as a PNG of the grid's own channels.

    add_image always encodes RGB; a grey grid encodes 5x faster as one channel, which matters when a small model logs
    grids while it trains.
    """
    png = encode_png(grid.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).cpu())  # rounded as save_image does
    image = Summary.Image(
        height=grid.shape[1], width=grid.shape[2], colorspace=len(grid), encoded_image_string=png.numpy().tobytes()
    )
    add_summary(writer, Summary(value=[Summary.Value(tag=tag, image=image)]), step)


def save_pictures(grids: dict[str, Tensor], out_dir: Path, writer: SummaryWriter) -> None:
    for name, grid in grids.items():
        save_image(grid, out_dir / f"{name}.png")
        add_grid(writer, f"eval/{name}", grid)
