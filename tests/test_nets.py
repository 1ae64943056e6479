import pytest
import torch
from torch import nn

from autoencoders.nets import ConvDecoder, ConvEncoder, ResidualBlock, build_nets, conv_transpose_output_size


@pytest.mark.parametrize(
    "i,k,s,p,op", [(7, 3, 2, 1, 1), (14, 3, 2, 1, 0), (1, 7, 1, 0, 0), (5, 4, 3, 2, 2), (9, 5, 2, 0, 1)]
)
def test_transpose_formula_matches_pytorch(i, k, s, p, op):
    layer = nn.ConvTranspose2d(1, 1, k, stride=s, padding=p, output_padding=op)
    assert layer(torch.zeros(1, 1, i, i)).shape[-1] == conv_transpose_output_size(i, k, s, p, op)


def test_default_conv_net_is_the_lectures_for_mnist():
    enc, dec = ConvEncoder((1, 28, 28), 8), ConvDecoder((1, 28, 28), 8)
    convs = [m for m in enc if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (1, 16, (3, 3), (2, 2), (1, 1)),
        (16, 32, (3, 3), (2, 2), (1, 1)),
        (32, 8, (7, 7), (1, 1), (0, 0)),
    ]
    deconvs = [m for m in dec if isinstance(m, nn.ConvTranspose2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.output_padding) for c in deconvs] == [
        (8, 32, (7, 7), (0, 0)),
        (32, 16, (3, 3), (1, 1)),
        (16, 1, (3, 3), (1, 1)),
    ]


@pytest.mark.parametrize("arch", ["mlp", "conv", "resnet"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64), (1, 27, 31), (3, 64, 48)])
def test_decoder_returns_the_input_shape(arch, shape):
    encoder, decoder = build_nets(arch, shape, code_dim=6, latent_dim=3)
    x = torch.rand(2, *shape)
    assert encoder(x).shape == (2, 6)
    assert decoder(torch.randn(2, 3)).shape == (2, *shape)


def test_resnet_blocks_are_residual_with_normalisation_and_train():
    encoder, decoder = build_nets("resnet", (3, 64, 64), 6, 6, widths=[16, 32, 64])
    blocks = [m for m in [*encoder.modules(), *decoder.modules()] if isinstance(m, ResidualBlock)]
    assert len(blocks) == 6 and all(any(isinstance(m, torch.nn.GroupNorm) for m in b.modules()) for b in blocks)
    block = blocks[0]
    x = torch.randn(2, 16, 64, 64)
    torch.testing.assert_close(block(x), torch.nn.functional.silu(block.body(x) + block.skip(x)))
    out = decoder(encoder(torch.rand(2, 3, 64, 64)))
    out.mean().backward()
    assert all(p.grad is not None for p in encoder.parameters())
