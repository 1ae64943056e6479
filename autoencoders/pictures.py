"""Picture grids of what a trained autoencoder does, at a fixed seed: reconstructions, samples, interpolations, a
latent traversal, and for 2-d codes the decoded manifold and a scatter of the codes; charts of a VAE's KL per code
dimension. Saved as PNG and to TensorBoard, with a description of each."""

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tensorboard.compat.proto.summary_pb2 import DATA_CLASS_BLOB_SEQUENCE, Summary
from tensorboard.plugins.image import metadata as image_metadata
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from torchvision.io import encode_png
from torchvision.utils import make_grid, save_image

from autoencoders.data import to_unit_float
from autoencoders.internals import add_summary
from autoencoders.models import AE

ImageSampler = Callable[[int, torch.Generator], Tensor]  # (n, generator) -> n decoded images


# What the rows and columns of each picture are: TensorBoard shows it beside the image (and evaluate.py's PNGs
# have the same names).
DESCRIPTIONS = {
    "reconstructions": "Top row: held-out images; bottom row: their reconstructions (the mean of p(x | code)).",
    "samples": "Decoded draws of the model's prior over codes, at a fixed seed (the same draws each time).",
    "interpolations": "One row per pair of held-out images: decoded a*z1 + (1-a)*z2 for a from 1 (left) to 0 (right).",
    "traversal": "One row per code dimension (VAEs: in order of KL, highest first): the code of one held-out image "
    "with that dimension swept over its mean +- 3 standard deviations of the held-out codes, left to right.",
    "manifold": "2-d codes: the decoded grid over each dimension's mean +- 3 standard deviations of the held-out "
    "codes (z[0] left to right, z[1] top to bottom); M2's beside the class of one held-out image.",
    "scatter": "2-d codes of held-out images, coloured by label.",
    "kl_per_dim": "VAEs: KL(q(z_u|x) || N(0, 1)) of each code dimension u, nats, the mean over held-out images.",
}


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
    `interpolations` (one row per pair of test images) and `traversal` (see `latent_traversal`, over the spread of
    the first 1000 test images' codes).

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
    held_out = to_unit_float(test_images[order[:1000]]).to(model.device)
    grids["traversal"] = image_grid(latent_traversal(model, held_out, steps, traversal_dims), nrow=steps)
    return grids


def code_spread(model: AE, images: Tensor) -> tuple[Tensor, Tensor]:
    """The mean and standard deviation of each code dimension over the codes of `images`."""
    codes = model.encode(images)
    return codes.mean(0), codes.std(0) if len(codes) > 1 else torch.ones_like(codes[0])


def kl_per_dim(model: AE, images: Tensor) -> Tensor | None:
    """A VAE's KL per code dimension (`VAE.kl_per_dim`), the mean over `images`; None for other models."""
    kl = model.kl_per_dim(images) if hasattr(model, "kl_per_dim") else None
    return None if kl is None else kl.mean(0)


def latent_traversal(model: AE, images: Tensor, steps: int, max_dims: int) -> Tensor:
    """Row by row, the code of `images[0]` with one dimension u set to `steps` values from m_u - 3 s_u to m_u + 3 s_u,
    m and s the mean and standard deviation of the codes of `images` (a plain AE's codes have no fixed scale);
    one row for each of `max_dims` dimensions: a VAE's with the largest KL first, in order (`kl_per_dim`), others
    in their order."""
    center, spread = code_spread(model, images)
    kl = kl_per_dim(model, images)
    dims = (torch.argsort(kl, descending=True) if kl is not None else torch.arange(len(center)))[:max_dims]
    z = model.encode(images[:1]).repeat(len(dims), steps, 1)  # (dims, steps, code)
    sweep = torch.linspace(-3, 3, steps, device=z.device)
    z[torch.arange(len(dims)), :, dims] = center[dims, None] + spread[dims, None] * sweep
    return model.decode(z.flatten(0, 1))


def manifold(model: AE, images: Tensor, steps: int = 15) -> Tensor:
    """For 2-d codes: decoded codes on a steps x steps grid over each dimension's mean +- 3 standard deviations of
    the codes of `images` (z[0] along a row, z[1] down the columns). The code's other numbers (M2's one-hot class)
    are those of `images[0]`."""
    center, spread = code_spread(model, images)
    sweep = torch.linspace(-3, 3, steps, device=center.device)
    z1, z0 = torch.meshgrid(center[1] + spread[1] * sweep, center[0] + spread[0] * sweep, indexing="ij")
    z = model.encode(images[:1]).repeat(steps * steps, 1)
    z[:, 0], z[:, 1] = z0.flatten(), z1.flatten()
    return model.decode(z)


def chart(draw: Callable, title: str, xlabel: str, ylabel: str) -> Tensor:
    """A matplotlib chart as a (3, H, W) image in [0, 1]: `draw(ax)` draws on its axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), layout="constrained")  # constrained: no axis label clipped
    draw(ax)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    fig.canvas.draw()
    rgb = torch.from_numpy(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    plt.close(fig)
    return rgb.permute(2, 0, 1).float() / 255


def scatter_chart(codes: Tensor, labels: Tensor) -> Tensor:
    """2-d codes coloured by label."""

    def draw(ax) -> None:
        points = ax.scatter(codes[:, 0].cpu(), codes[:, 1].cpu(), c=labels.cpu(), cmap="tab10", s=4)
        ax.legend(*points.legend_elements(), title="label", fontsize="small", loc="best")

    return chart(draw, "held-out codes", "z[0]", "z[1]")


def kl_chart(kl: Tensor) -> Tensor:
    """A bar per code dimension: its KL in nats."""
    from matplotlib.ticker import MaxNLocator

    def draw(ax) -> None:
        ax.bar(range(len(kl)), kl.cpu())
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))

    return chart(draw, "KL per code dimension", "dimension u", "KL (nats)")


def image_grid(images: Tensor, nrow: int) -> Tensor:
    """make_grid of (N, C, H, W) images, keeping C channels (make_grid copies a grey image into three)."""
    return make_grid(images, nrow=nrow)[: images.shape[1]]


def add_grid(writer: SummaryWriter, tag: str, grid: Tensor, step: int = 0) -> None:
    """`writer.add_image` for an image_grid in [0, 1], as a PNG of the grid's own channels.

    add_image always encodes RGB; a grey grid encodes 5x faster as one channel, which matters when a small model logs
    grids while it trains.
    """
    png = encode_png(grid.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).cpu())  # rounded as save_image does
    add_png(writer, tag, png.numpy().tobytes(), (len(grid), grid.shape[1], grid.shape[2]), step)


def add_png(writer: SummaryWriter, tag: str, png: bytes, shape: tuple[int, int, int], step: int = 0) -> None:
    """A PNG image of `shape` (C, H, W) as TensorBoard's image `tag`. What it shows (DESCRIPTIONS) goes in the images
    plugin's own metadata, with the data class that TensorBoard's default (fast) loader keeps: without them it keeps
    the image and drops the description."""
    image = Summary.Image(height=shape[1], width=shape[2], colorspace=shape[0], encoded_image_string=png)
    name = tag.rsplit("/", 1)[-1]
    description = DESCRIPTIONS.get(name) or DESCRIPTIONS.get(name.split("_")[0], "")  # samples_gmm: samples'
    metadata = image_metadata.create_summary_metadata(tag, description)
    metadata.data_class = DATA_CLASS_BLOB_SEQUENCE
    add_summary(writer, Summary(value=[Summary.Value(tag=tag, image=image, metadata=metadata)]), step)


def save_pictures(grids: dict[str, Tensor], out_dir: Path) -> None:
    for name, grid in grids.items():
        save_image(grid, out_dir / f"{name}.png")
