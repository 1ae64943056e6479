import gzip
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from autoencoders.data import (
    Batches,
    ImageDataModule,
    ImageFolderSource,
    MNISTSubset,
    TorchvisionSource,
    split_position,
    to_unit_float,
)
from autoencoders.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf" / "data"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def subset_module(cache_dir: Path, **kwargs) -> ImageDataModule:
    dm = ImageDataModule(MNISTSubset(cache_dir), **kwargs)
    dm.setup()
    return dm


def hashes(images: torch.Tensor) -> list[bytes]:
    return [image.numpy().tobytes() for image in images]


def test_mnist_subset_splits(cache_dir: Path) -> None:
    dm = subset_module(cache_dir)
    assert (cache_dir / "mnist_5k.pt").exists()
    assert dm.image_shape == (1, 28, 28) and dm.num_classes == 10
    sets = {"train": dm.train_set, "val": dm.val_set, "test": dm.test_set}
    assert {k: len(s) for k, s in sets.items()} == {"train": 4000, "val": 500, "test": 500}
    for split in sets.values():
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64  # float only per batch
        assert split.images.max() > 230
    assert torch.bincount(dm.val_set.labels).tolist() == [50] * 10
    assert torch.bincount(dm.test_set.labels).tolist() == [50] * 10
    all_hashes = [h for s in sets.values() for h in hashes(s.images)]
    assert len(set(all_hashes)) == 5000  # disjoint, and together the whole subset

    again, other = subset_module(cache_dir), subset_module(cache_dir, split_seed=1)
    assert torch.equal(again.inputs("val"), dm.inputs("val"))
    assert torch.equal(again.train_set.labels, dm.train_set.labels)
    assert set(hashes(other.inputs("val"))) != set(hashes(dm.inputs("val")))


def test_the_split_depends_on_split_seed_only_and_label_subsets_on_seed(cache_dir: Path) -> None:
    """Runs with seeds 0, 1 and 2 share one train/val/test split; their few-label subsets differ, drawn from it."""
    runs = [subset_module(cache_dir, seed=seed, binarize="dynamic") for seed in (0, 1, 2)]
    for dm in runs[1:]:
        for name in ("train", "val", "test"):
            assert torch.equal(dm.split_index.get(name, torch.empty(0)), runs[0].split_index.get(name, torch.empty(0)))
        assert torch.equal(dm.inputs("test"), runs[0].inputs("test"))  # binarised alike, too
        assert dm.held_out_overlap(runs[0].state_dict()) == 0
    few = [subset_module(cache_dir, seed=seed, labels_per_class=10) for seed in (0, 1, 2)]
    assert len({tuple(dm.split_index["train"].tolist()) for dm in few}) == 3
    train = set(runs[0].split_index["train"].tolist())
    assert all(set(dm.split_index["train"].tolist()) <= train for dm in few)


def test_held_out_overlap_counts_val_and_test_images_another_split_trained_on(cache_dir: Path) -> None:
    dm, other = subset_module(cache_dir), subset_module(cache_dir, split_seed=1)
    trained_on = other.state_dict()
    expected = len(
        set(trained_on["train_index"].tolist())
        & set(torch.cat([dm.split_index["val"], dm.split_index["test"]]).tolist())
    )
    assert dm.held_out_overlap(trained_on) == expected > 700  # about 80% of the 1,000 held-out images
    assert dm.held_out_overlap({**trained_on, "source": "torchvision:mnist"}) == 0  # other images altogether


@pytest.mark.parametrize("binarize", ["dynamic", "static"])
def test_binarized_val_and_test_are_fixed_and_training_images_dynamic_or_static(cache_dir: Path, binarize: str) -> None:
    dm = subset_module(cache_dir, binarize=binarize, seed=3)
    grey = subset_module(cache_dir)
    for split in ("val", "test"):
        images = dm.inputs(split)
        assert set(images.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(dm.real_split(split)[0], grey.inputs(split))
        # a Bernoulli draw of each pixel's intensity: as bright on average as the grey images
        assert abs(images.mean() - dm.real_split(split)[0].mean()) < 0.01
    assert torch.equal(dm.inputs("test"), subset_module(cache_dir, binarize=binarize, seed=4).inputs("test"))

    # the data module binarises dynamically only while a Trainer trains, each batch's draws from (seed, epoch, batch)
    progress = SimpleNamespace(completed=0)  # the trainer's count of the epoch's trained batches
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(current=progress)))
    dm.trainer = SimpleNamespace(training=True, current_epoch=0, global_rank=0, fit_loop=loop)
    batch = dm.train_set.images[:64]  # uint8, as batches come
    x = to_unit_float(batch)
    draws = []
    for index in (0, 1, 0):
        progress.completed = index
        draws.append(dm.on_after_batch_transfer((batch, None), 0)[0])
    if binarize == "static":
        assert set(x.unique().tolist()) == {0.0, 1.0} and all(torch.equal(d, x) for d in draws)
    else:
        assert len(x.unique()) > 2 and all(set(d.unique().tolist()) == {0.0, 1.0} for d in draws)
        # each batch its own draws, the same whenever that batch is trained (again, after a resume)
        assert not torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])
        assert abs(torch.stack(draws).mean() - x.mean()) < 0.02


def test_setup_is_idempotent(cache_dir: Path) -> None:
    dm = subset_module(cache_dir)
    train_set = dm.train_set
    dm.setup("fit")
    dm.setup("test")
    assert dm.train_set is train_set


def test_labels_per_class(cache_dir: Path) -> None:
    full = subset_module(cache_dir)
    few, more = subset_module(cache_dir, labels_per_class=5), subset_module(cache_dir, labels_per_class=20)
    assert torch.bincount(few.train_set.labels).tolist() == [5] * 10
    assert set(hashes(few.inputs("train"))) <= set(hashes(more.inputs("train")))
    assert torch.equal(few.inputs("val"), full.inputs("val"))
    assert torch.equal(few.inputs("test"), full.inputs("test"))
    with pytest.raises(UserError, match="labels_per_class=401"):
        subset_module(cache_dir, labels_per_class=401)


def test_val_labels_per_class_keeps_that_many_val_images_per_class_and_leaves_test_as_it_was(cache_dir: Path) -> None:
    """The realistic few-label protocol: selection on no more labels than training has (Oliver et al., 2018)."""
    full = subset_module(cache_dir, binarize="static")
    small = [subset_module(cache_dir, binarize="static", labels_per_class=n, val_labels_per_class=n) for n in (5, 20)]
    assert [torch.bincount(dm.val_set.labels).tolist() for dm in small] == [[5] * 10, [20] * 10]
    assert set(hashes(small[0].inputs("val"))) <= set(hashes(small[1].inputs("val"))) <= set(hashes(full.inputs("val")))
    assert set(small[0].split_index["val"].tolist()) <= set(full.split_index["val"].tolist())
    for dm in small:  # the same binary draws of the test images, whatever the val subset
        assert torch.equal(dm.inputs("test"), full.inputs("test"))
    other_seed = subset_module(cache_dir, binarize="static", labels_per_class=5, val_labels_per_class=5, seed=1)
    assert not torch.equal(other_seed.split_index["val"], small[0].split_index["val"])
    with pytest.raises(UserError, match="val_labels_per_class=51"):  # 50 val images per class
        subset_module(cache_dir, val_labels_per_class=51)


def test_fractions_that_leave_no_training_data(cache_dir: Path) -> None:  # each alone: tests/test_settings.py
    with pytest.raises(UserError, match=r"data.val_fraction \+ data.test_fraction = 1.0 leaves no training data"):
        ImageDataModule(MNISTSubset(cache_dir), val_fraction=0.5, test_fraction=0.5)


def test_batches_cover_each_train_image_once(cache_dir: Path) -> None:
    dm = subset_module(cache_dir, batch_size=128)
    batches = list(dm.train_dataloader())
    assert [len(x) for x, _ in batches] == [128] * 31 + [32]
    x, y = batches[0]
    assert x.shape == (128, 1, 28, 28) and x.dtype == torch.uint8 and y.shape == (128,) and y.dtype == torch.int64
    seen = [h for x, _ in batches for h in hashes(x)]
    assert sorted(seen) == sorted(hashes(dm.train_set.images))
    assert seen != hashes(dm.train_set.images)  # shuffled
    first_epoch = [h for x, _ in dm.train_dataloader() for h in hashes(x)]
    assert first_epoch == seen  # the shuffle is seeded
    val = torch.cat([x for x, _ in dm.val_dataloader()])
    assert torch.equal(val, dm.val_set.images)  # val and test keep their order
    assert sum(len(y) for _, y in dm.test_dataloader()) == 500


@pytest.mark.parametrize("world", [1, 2, 3])
def test_processes_share_each_split_exactly_with_equal_training_steps(cache_dir: Path, world: int) -> None:
    """What DDP's processes get: every val image once (no padding), batches numbered as one process numbers them,
    and training shards of one permutation, disjoint and of equal length."""
    dm = subset_module(cache_dir, batch_size=128)
    alone = list(Batches(dm.val_set, 128))
    positions = {}
    for rank in range(world):
        for batch_idx, (x, _) in enumerate(Batches(dm.val_set, 128, rank, world)):
            positions[split_position(batch_idx, rank, world)] = x
    assert sorted(positions) == list(range(len(alone)))
    assert all(torch.equal(positions[i], x) for i, (x, _) in enumerate(alone))

    shards = [list(Batches(dm.train_set, 128, rank, world, shuffle_seed=0)) for rank in range(world)]
    assert len({len(shard) for shard in shards}) == 1  # every process takes as many steps
    seen = [h for shard in shards for x, _ in shard for h in hashes(x)]
    assert len(seen) == len(set(seen)) == len(dm.train_set) // world * world
    assert set(seen) <= set(hashes(dm.train_set.images))


def test_a_split_smaller_than_the_batch_still_gives_every_process_a_batch(cache_dir: Path) -> None:
    dm = subset_module(cache_dir, batch_size=1000)
    shares = [list(Batches(dm.val_set, 1000, rank, 2)) for rank in range(2)]
    assert [[len(y) for _, y in share] for share in shares] == [[250], [250]]
    with pytest.raises(UserError, match="cannot be shared by 501 processes"):
        Batches(dm.val_set, 128, 0, 501)


def test_splits_move_to_the_accelerator_train_first_while_they_fit_under_the_cap(cache_dir: Path) -> None:
    mb = 1e-3  # GB; train holds 4000 28x28 uint8 images (3.1 MB with labels), val and test 500 each (0.4 MB)

    class OnAnAccelerator:  # the meta device stands in for a GPU: tensors without memory
        strategy = type("Strategy", (), {"root_device": torch.device("meta")})
        global_rank, world_size, current_epoch, lightning_module = 0, 1, 0, None

    for cap_mb, moved in ((10, {"train", "val", "test"}), (3.6, {"train", "val"}), (3, {"val", "test"}), (0, set())):
        dm = subset_module(cache_dir, device_cap_gb=cap_mb * mb)
        dm.trainer = OnAnAccelerator()
        loaders = {name: getattr(dm, f"{name}_dataloader")() for name in ("val", "train", "test")}
        on_device = {name for name, batches in loaders.items() if batches.split.images.is_meta}
        assert on_device == moved, cap_mb
        assert dm.train_set.images.device.type == "cpu"  # the host copy stays


def test_host_memory_holds_a_large_image_set_as_uint8(tmp_path: Path) -> None:
    """8,000 RGB 64x64 images: 98 MB as uint8, which float32 would make 393 MB."""
    code = """
import psutil, torch
from autoencoders.data import ImageDataModule, Source, SourceData

class Noise(Source):
    def load(self):
        return SourceData(torch.randint(0, 256, (8000, 3, 64, 64), dtype=torch.uint8), torch.arange(8000) % 10, 10)

process = psutil.Process()
before = process.memory_info().rss
dm = ImageDataModule(Noise(), binarize=None)
dm.setup()
for _ in dm.train_dataloader():
    pass
print((process.memory_info().rss - before) / (8000 * 3 * 64 * 64))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    held = float(result.stdout)
    assert 0.9 < held < 1.3  # the uint8 images once (float32 would be 4)


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    """An IDX file as MNIST ships it: magic (0, 0, type 0x08 = uint8, ndim), big-endian dims, then the bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def write_mnist_like(root: Path, folder: str, n_train: int = 60, n_test: int = 20) -> None:
    """torchvision's layout: it reads the uncompressed `<root>/<Class>/raw/*-ubyte` files (the .gz may sit beside)."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28))
        labels = np.arange(n) % 10
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images, compress=True)


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_torchvision_from_idx_files(tmp_path: Path, name: str, folder: str) -> None:
    write_mnist_like(tmp_path, folder)
    dm = ImageDataModule(TorchvisionSource(name, tmp_path, download=False), batch_size=16)
    dm.prepare_data()
    dm.setup()
    assert dm.image_shape == (1, 28, 28) and dm.num_classes == 10
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (50, 10, 20)  # test = the official t10k files
    assert torch.bincount(dm.val_set.labels).tolist() == [1] * 10
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.uint8  # float per batch: on_after_batch_transfer
    assert y.tolist() == [i % 10 for i in range(16)]


def test_torchvision_missing_data(tmp_path: Path) -> None:
    dm = ImageDataModule(TorchvisionSource("kmnist", tmp_path / "nowhere", download=False))
    with pytest.raises(UserError, match=r"download=true") as err:
        dm.setup()
    assert str(tmp_path / "nowhere" / "KMNIST" / "raw") in str(err.value)


def test_torchvision_unknown_name() -> None:
    with pytest.raises(UserError, match="fashion_mnist"):
        TorchvisionSource("svhn", "data")


def write_png(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_with_classes(tmp_path: Path, channels: int) -> None:
    for label, name in enumerate(["cat", "dog"]):
        for i in range(10):
            write_png(tmp_path / name / f"{i}.png", (20 + i, 30 - i), seed=10 * label + i)
    (tmp_path / "dog" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "dog" / "notes.txt").write_text("ignored: not an image")
    with pytest.warns(UserWarning, match="broken.png"):
        data = ImageFolderSource(tmp_path, image_size=[16, 12], channels=channels).load()
    assert data.images.shape == (20, channels, 16, 12) and data.images.dtype == torch.uint8
    assert data.labels.tolist() == [0] * 10 + [1] * 10 and data.num_classes == 2

    dm = ImageDataModule(ImageFolderSource(tmp_path, image_size=8, channels=channels), batch_size=4)
    with pytest.warns(UserWarning, match="broken.png"):
        dm.setup()
    assert dm.image_shape == (channels, 8, 8) and dm.num_classes == 2
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (16, 2, 2)


def test_image_folder_flat(tmp_path: Path) -> None:
    for i in range(5):
        write_png(tmp_path / f"{i}.png", (10 + i, 10), seed=i, mode="L" if i % 2 else "RGB")
    data = ImageFolderSource(tmp_path, image_size=10, channels=3).load()
    assert data.images.shape == (5, 3, 10, 10) and data.labels.tolist() == [0] * 5 and data.num_classes == 1
    with pytest.raises(UserError, match="split of 5 images is empty"):  # 10% of 5 images rounds to none
        ImageDataModule(ImageFolderSource(tmp_path)).setup()


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        ImageFolderSource(tmp_path / "missing").load()
    with pytest.raises(UserError, match="no image files"):
        ImageFolderSource(tmp_path).load()
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="bad.png"), pytest.raises(UserError, match="could be read"):
        ImageFolderSource(tmp_path).load()
    with pytest.raises(UserError, match="channels=2"):
        ImageFolderSource(tmp_path, channels=2)
    with pytest.raises(UserError, match="image_size"):
        ImageFolderSource(tmp_path, image_size=[28])


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_configs_instantiate(path: Path, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOENCODERS_CACHE", str(cache_dir))
    overrides = [f"data={path.stem}", "seed=3"] + [f"data.source.root={tmp_path}"] * (path.stem == "image_folder")
    with initialize_config_dir(str(CONF.parent), version_base="1.3"):
        cfg = compose("train", overrides)
    dm = instantiate(cfg.data)
    assert isinstance(dm, ImageDataModule) and dm.hparams.seed == 3 and dm.hparams.batch_size == 128
    if path.stem == "mnist_subset":
        assert dm.source.cache_dir == cache_dir
        dm.setup()
        assert len(dm.train_set) == 4000
