"""Named random streams: streams that differ in any part of (seed, name, numbers) draw differently, and each use of
randomness in the data has a stream of its own."""

from pathlib import Path

import pytest
import torch

from autoencoders import seeds
from autoencoders.data import ImageDataModule, MNISTSubset
from tests.test_data import hashes


def draws(generator: torch.Generator) -> tuple[float, ...]:
    return tuple(torch.rand(8, generator=generator).tolist())


def test_streams_differ_in_every_part_of_their_key_and_seeds_2_to_the_32_apart_are_no_longer_one_stream():
    keys = [(0, "order", 0), (0, "order", 1), (0, "noise", 0), (0, "noise", 0, 0), (0, "noise", 0, 1), (1, "order", 0),
            (2**32, "order", 0), (2 * 2**32, "order", 0)]  # fmt: skip
    assert len({draws(seeds.generator(*key)) for key in keys}) == len(keys)
    assert draws(seeds.generator(0, "order", 0)) == draws(seeds.generator(0, "order", 0))
    # what the streams replace: torch's CPU generator keeps a seed's low 32 bits, so these were one stream
    assert draws(torch.Generator().manual_seed(0)) == draws(torch.Generator().manual_seed(2**32))


def test_the_labelled_subsets_and_the_probes_bank_are_drawn_from_streams_of_their_own(tmp_path: Path):
    dm = ImageDataModule(MNISTSubset(tmp_path), labels_per_class=10, probe_labels_per_class=10, binarize=None)
    dm.setup()
    labelled, bank = set(hashes(dm.inputs("train"))), set(hashes(dm.probe_split()[0]))
    assert len(labelled) == len(bank) == 100
    assert len(labelled & bank) < 20  # 100 of 4,000 drawn twice at random share 2.5 on average; one stream: all 100


@pytest.mark.parametrize("bad", [(-1, ()), (0, (-1,))])
def test_a_negative_seed_or_number_is_refused(bad):
    seed, numbers = bad
    with pytest.raises(ValueError, match="non-negative"):
        seeds.stream_seed(seed, "order", *numbers)
