"""Encoder and decoder architectures. Decoders return a likelihood's parameters; the model maps them to images."""

import math
from collections.abc import Sequence
from math import prod

import torch
from torch import Tensor, nn

from autoencoders.errors import UserError


def conv_transpose_output_size(i: int, k: int, s: int = 1, p: int = 0, op: int = 0, d: int = 1) -> int:
    """Output size of ConvTranspose2d along one axis: o = (i-1)*s + d*(k-1) - 2p + op + 1."""
    return (i - 1) * s + d * (k - 1) - 2 * p + op + 1


def conv_output_size(i: int, k: int, s: int = 1, p: int = 0) -> int:
    return (i + 2 * p - k) // s + 1


def halved_sizes(h: int, w: int, stages: int) -> list[tuple[int, int]]:
    """(h, w) and the sizes after each of `stages` stride-2, padding-1 3x3 convs: what a decoder must retrace."""
    sizes = [(h, w)]
    for _ in range(stages):
        sizes.append(tuple(conv_output_size(i, 3, 2, 1) for i in sizes[-1]))
    return sizes


class MLPEncoder(nn.Sequential):
    def __init__(self, image_shape: Sequence[int], out_dim: int, widths: Sequence[int] = (512, 256)):
        layers: list[nn.Module] = [nn.Flatten()]
        width = prod(image_shape)
        for h in widths:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        super().__init__(*layers, nn.Linear(width, out_dim))


class MLPDecoder(nn.Sequential):
    def __init__(self, image_shape: Sequence[int], latent_dim: int, widths: Sequence[int] = (512, 256)):
        layers: list[nn.Module] = []
        width = latent_dim
        for h in reversed(widths):
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        super().__init__(*layers, nn.Linear(width, prod(image_shape)), nn.Unflatten(1, tuple(image_shape)))


class ConvEncoder(nn.Sequential):
    """The lecture's encoder, for any image size: two stride-2 3x3 convs, then one conv that covers what is left."""

    def __init__(self, image_shape: Sequence[int], out_dim: int, widths: Sequence[int] = (16, 32)):
        c, h, w = image_shape
        layers: list[nn.Module] = []
        for ch in widths:
            layers += [nn.Conv2d(c, ch, 3, stride=2, padding=1), nn.ReLU()]
            c, h, w = ch, conv_output_size(h, 3, 2, 1), conv_output_size(w, 3, 2, 1)
        super().__init__(*layers, nn.Conv2d(c, out_dim, (h, w)), nn.Flatten())


class ConvDecoder(nn.Sequential):
    """Mirror of ConvEncoder; output_padding is solved from the transposed-conv formula so shapes match exactly."""

    def __init__(self, image_shape: Sequence[int], latent_dim: int, widths: Sequence[int] = (16, 32)):
        out_c, out_h, out_w = image_shape
        sizes = halved_sizes(out_h, out_w, len(widths))
        layers: list[nn.Module] = [
            nn.Unflatten(1, (latent_dim, 1, 1)),
            nn.ConvTranspose2d(latent_dim, widths[-1], sizes[-1]),
        ]
        in_channels = list(reversed(widths))
        out_channels = in_channels[1:] + [out_c]
        for (h, w), (target_h, target_w), c_in, c_out in zip(
            reversed(sizes[1:]), reversed(sizes[:-1]), in_channels, out_channels, strict=True
        ):
            op = (target_h - conv_transpose_output_size(h, 3, 2, 1), target_w - conv_transpose_output_size(w, 3, 2, 1))
            layers += [nn.ReLU(), nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=op)]
        super().__init__(*layers)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ResidualBlock(nn.Module):
    """Two 3x3 convs with GroupNorm and SiLU beside a skip connection; `stride` 2 halves the image (a strided conv),
    `upsample` doubles it (a transposed conv whose output_padding gives exactly `size`)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, size: tuple[int, int] | None = None):
        super().__init__()
        if size is None:  # downsampling or same size
            first = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
            self.skip = nn.Identity() if stride == 1 and c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride=stride)
        else:  # upsampling to `size` from half of it
            h, w = size
            i_h, i_w = (h + 1) // 2, (w + 1) // 2  # what a stride-2, padding-1 3x3 conv made of size (h, w)
            op = (h - conv_transpose_output_size(i_h, 3, 2, 1), w - conv_transpose_output_size(i_w, 3, 2, 1))
            first = nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=op)
            skip_op = (h - conv_transpose_output_size(i_h, 1, 2), w - conv_transpose_output_size(i_w, 1, 2))
            self.skip = nn.ConvTranspose2d(c_in, c_out, 1, stride=2, output_padding=skip_op)
        self.body = nn.Sequential(first, _norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1), _norm(c_out))
        self.out = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.body(x) + self.skip(x))


class ResNetEncoder(nn.Sequential):
    """A 3x3 stem, one stride-2 residual block per width, then one conv that covers what is left (as ConvEncoder)."""

    def __init__(self, image_shape: Sequence[int], out_dim: int, widths: Sequence[int] = (32, 64)):
        c, h, w = image_shape
        layers: list[nn.Module] = [nn.Conv2d(c, widths[0], 3, padding=1), _norm(widths[0]), nn.SiLU()]
        c = widths[0]
        for ch in widths:
            layers.append(ResidualBlock(c, ch, stride=2))
            c, h, w = ch, conv_output_size(h, 3, 2, 1), conv_output_size(w, 3, 2, 1)
        super().__init__(*layers, nn.Conv2d(c, out_dim, (h, w)), nn.Flatten())


class ResNetDecoder(nn.Sequential):
    """Mirror of ResNetEncoder: the code to the smallest grid by a transposed conv, one upsampling residual block per
    width (output_padding solved from the transposed-conv formula, so every size is exact), a 3x3 conv to the output."""

    def __init__(self, image_shape: Sequence[int], latent_dim: int, widths: Sequence[int] = (32, 64)):
        out_c, out_h, out_w = image_shape
        sizes = halved_sizes(out_h, out_w, len(widths))
        layers: list[nn.Module] = [
            nn.Unflatten(1, (latent_dim, 1, 1)),
            nn.ConvTranspose2d(latent_dim, widths[-1], sizes[-1]),
            _norm(widths[-1]),
            nn.SiLU(),
        ]
        channels = list(reversed(widths))
        for size, c_in, c_out in zip(reversed(sizes[:-1]), channels, channels[1:] + channels[-1:], strict=True):
            layers.append(ResidualBlock(c_in, c_out, size=size))
        super().__init__(*layers, nn.Conv2d(channels[-1], out_c, 3, padding=1))


class MADE(nn.Module):
    """A masked autoencoder for distribution estimation (Germain et al., 2015): an MLP from (..., dim) inputs to
    `outputs` numbers per input dim, output i depending only on inputs 1..i-1 (in the order given), so its Jacobian
    from inputs to each output block is strictly lower triangular. An optional `context` (e.g. an encoder's features)
    enters the first hidden layer unmasked."""

    def __init__(self, dim: int, hidden: Sequence[int] = (64, 64), outputs: int = 2, context_dim: int = 0):
        super().__init__()
        self.dim, self.outputs = dim, outputs
        degrees = [torch.arange(1, dim + 1)]  # input i has degree i
        degrees += [torch.arange(width) % max(1, dim - 1) + 1 for width in hidden]  # hidden units: 1..dim-1, cycled
        self.layers = nn.ModuleList(nn.Linear(len(a), len(b)) for a, b in zip(degrees, degrees[1:], strict=False))
        self.out = nn.Linear(len(degrees[-1]), dim * outputs)
        self.context = nn.Linear(context_dim, hidden[0], bias=False) if context_dim else None
        for i in range(len(hidden)):  # a hidden unit sees inputs of degree <= its own
            self.register_buffer(f"mask{i}", (degrees[i + 1][:, None] >= degrees[i][None]).float())
        # output block k, entry i sees hidden units of degree < i
        out_degrees = torch.arange(1, dim + 1).repeat(outputs)
        self.register_buffer("out_mask", (out_degrees[:, None] > degrees[-1][None]).float())

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """(..., dim) -> (..., outputs, dim)."""
        h = x
        for i, layer in enumerate(self.layers):
            h = nn.functional.linear(h, layer.weight * getattr(self, f"mask{i}"), layer.bias)
            if i == 0 and self.context is not None:
                h = h + self.context(context)
            h = nn.functional.relu(h)
        return nn.functional.linear(h, self.out.weight * self.out_mask, self.out.bias).unflatten(-1, (self.outputs, -1))


class GatedPixelCNN(nn.Module):
    """A gated PixelCNN (van den Oord et al., 2016, "Conditional image generation with PixelCNN decoders") over grids
    of `classes`-valued tokens: `layers` gated layers of `channels`, each a vertical stack (the rows above) and a
    horizontal stack (the tokens to the left in the row), which see no token at or after a position in raster order
    and, without the masked PixelCNN's blind spot, every earlier one within their reach: `layers` columns to the left
    and rows above (a grid of at most layers + 1 columns and rows is seen whole). Its logits at each position predict
    that token."""

    def __init__(self, classes: int, channels: int = 64, layers: int = 5, kernel: int = 3):
        super().__init__()
        self.embed = nn.Embedding(classes, channels)
        self.layers = nn.ModuleList(GatedLayer(channels, kernel) for _ in range(layers))
        head = [nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, classes, 1)]
        self.out = nn.Sequential(*head)

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, H, W) tokens -> (B, classes, H, W) logits."""
        x = self.embed(tokens).permute(0, 3, 1, 2)
        # Shifted once here, so every layer may see its own row (vertical) and column (horizontal): the first
        # layer's then lie strictly above and to the left of each token.
        vertical = nn.functional.pad(x, (0, 0, 1, 0))[..., :-1, :]
        horizontal = nn.functional.pad(x, (1, 0))[..., :-1]
        for layer in self.layers:
            vertical, horizontal = layer(vertical, horizontal)
        return self.out(horizontal)


class GatedLayer(nn.Module):
    """One gated layer: tanh(a) * sigmoid(b) of a causal conv in each stack, the vertical stack's features fed into
    the horizontal one, and a residual connection on the horizontal stack."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.reach = kernel // 2
        self.vertical = nn.Conv2d(channels, 2 * channels, (self.reach + 1, kernel))  # rows i-reach .. i
        self.horizontal = nn.Conv2d(channels, 2 * channels, (1, self.reach + 1))  # columns j-reach .. j
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.horizontal_out = nn.Conv2d(channels, channels, 1)

    def forward(self, vertical: Tensor, horizontal: Tensor) -> tuple[Tensor, Tensor]:
        r = self.reach
        v = self.vertical(nn.functional.pad(vertical, (r, r, r, 0)))
        h = self.horizontal(nn.functional.pad(horizontal, (r, 0))) + self.vertical_to_horizontal(v)
        return _gate(v), horizontal + self.horizontal_out(_gate(h))


def _gate(x: Tensor) -> Tensor:
    a, b = x.chunk(2, 1)
    return torch.tanh(a) * torch.sigmoid(b)


NETS: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "mlp": (MLPEncoder, MLPDecoder),
    "conv": (ConvEncoder, ConvDecoder),
    "resnet": (ResNetEncoder, ResNetDecoder),
}


def build_nets(
    arch: str,
    image_shape: Sequence[int],
    code_dim: int,
    latent_dim: int,
    widths: Sequence[int] | None = None,
    decoder_shape: Sequence[int] | None = None,
) -> tuple[nn.Module, nn.Module]:
    """Encoder mapping images to `code_dim` numbers, and decoder mapping `latent_dim` codes to `decoder_shape`
    (default: the image shape) parameters of the likelihood, e.g. logits, or means and log-scales.

    `widths` are hidden-layer sizes for `mlp` (none: one linear map) and channel counts for `conv` and `resnet` (one
    stride-2 stage each, at least one); None keeps the net's default. Each is positive, and `arch` one of NETS
    (config.AEConfig declares both).
    """
    if widths is not None and not widths and arch != "mlp":
        raise UserError(
            f"model.widths=[] gives arch={arch} no stage, and its nets need at least one: a channel count per stride-2 "
            "stage. Use e.g. model.widths=[16,32], or null for the default."
        )
    encoder_cls, decoder_cls = NETS[arch]
    kwargs = {} if widths is None else {"widths": tuple(widths)}
    decoder = decoder_cls(decoder_shape or image_shape, latent_dim, **kwargs)
    nets = encoder_cls(image_shape, code_dim, **kwargs), decoder
    if arch != "mlp":  # NHWC weights: 6-20% faster conv epochs on a 2-core CPU (benchmarks/levers.py)
        for net in nets:
            net.to(memory_format=torch.channels_last)
    return nets
