"""Named random streams of one seed: each use of randomness (batch order, training noise, few-label subsets, a
VQ codebook's draws, held-out noise) draws from a stream of its own, derived from (seed, name, numbers...).

numpy's SeedSequence mixes the seed and the path into well-spread bits, so streams that differ in any part are
independent. Arithmetic such as `seed + k * 2**32` is not: torch's CPU generator keeps only a seed's low 32 bits, so
those "streams" were one and the same."""

import zlib

import numpy as np
import torch


def stream_seed(seed: int, name: str, *numbers: int) -> int:
    """The seed (63 bits) of the stream `name` of `seed`, e.g. stream_seed(0, "noise", epoch, rank). Torch's CPU
    generator keeps its low 32 bits, which are as well mixed: of 100,000 streams, two may then coincide (one pair
    expected), which no result can notice; a GPU's generator keeps all 63."""
    if seed < 0 or any(n < 0 for n in numbers):
        raise ValueError(f"a stream of seed {seed} and numbers {numbers}: both must be non-negative")
    key = (zlib.crc32(name.encode()), *numbers)
    (state,) = np.random.SeedSequence(seed, spawn_key=key).generate_state(1, np.uint64)
    return int(state) >> 1


def generator(seed: int, name: str, *numbers: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on `device` seeded with the stream `name` of `seed` (see stream_seed)."""
    return torch.Generator(device).manual_seed(stream_seed(seed, name, *numbers))


def seed_torch(seed: int, device: torch.device) -> None:
    """Seed torch's global CPU generator, and `device`'s if it is a GPU. (torch.manual_seed seeds every backend's
    generators: 0.35 ms, too slow for every step.)"""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)  # this process's GPU
