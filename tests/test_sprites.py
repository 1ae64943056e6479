"""data=sprites: dSprites-like shapes made from five factors, each checked on the pixels (centroids, areas, symmetries)
rather than against the renderer's own formulas, and kept aligned with the images through every split."""

import math

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from autoencoders.data import ImageDataModule, Source, SourceData, SpritesSource
from autoencoders.data.sprites import FACTOR_NAMES, render_templates
from autoencoders.errors import UserError
from autoencoders.evaluation import evaluate
from autoencoders.likelihoods import for_data
from autoencoders.training import build, train
from tests.helpers import ROOT, TINY, compose_train

# 3 shapes x 3 scales x 4 orientations (0, 90, 180, 270 degrees) x 5 x 5 positions = 900 images of 32x32. Shapes at
# scale 1 are 16 pixels across; centres move in whole pixels, 4 apart, from 7.5 to 23.5 (pixel-index coordinates).
SMALL = {"image_size": 32, "scales": 3, "orientations": 4, "positions": 5}
SQUARE, ELLIPSE, HEART = 0, 1, 2
SHAPE, SCALE, ORIENTATION, POS_X, POS_Y = range(5)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> SourceData:
    return SpritesSource(tmp_path_factory.mktemp("sprites"), **SMALL).load()


def by_factors(data: SourceData) -> torch.Tensor:
    """The white pixels (float 0/1, H x W) of every grid point, indexed [shape, scale, orientation, pos_x, pos_y]."""
    grid = torch.zeros(*data.factor_sizes, *data.images.shape[2:])
    grid[tuple(data.factors.T)] = data.images[:, 0].float() / 255
    return grid


def centroid(white: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(column, row) centre of mass of the white pixels of images (... x H x W), in pixel-index coordinates."""
    rows, cols = torch.meshgrid(*(torch.arange(n, dtype=torch.float) for n in white.shape[-2:]), indexing="ij")
    area = white.sum((-1, -2))
    return (white * cols).sum((-1, -2)) / area, (white * rows).sum((-1, -2)) / area


def test_the_same_settings_give_the_same_images_and_a_reload_from_the_cache_equals_them(tmp_path, monkeypatch):
    made = SpritesSource(tmp_path / "a", **SMALL).load()
    assert made.images.shape == (900, 1, 32, 32) and made.images.dtype == torch.uint8
    assert set(made.images.unique().tolist()) == {0, 255}
    assert made.factors.dtype == torch.int64 and made.factors.shape == (900, 5)
    assert made.factor_names == FACTOR_NAMES and made.factor_sizes == (3, 3, 4, 5, 5)
    assert len(set(map(tuple, made.factors.tolist()))) == 900  # every grid point once
    assert torch.equal(made.labels, made.factors[:, SHAPE]) and made.num_classes == 3
    assert (made.images.flatten(1) > 0).any(1).all()  # no image is empty

    again = SpritesSource(tmp_path / "b", **SMALL).load()  # made again, elsewhere
    monkeypatch.setattr(SpritesSource, "_render", lambda *args: pytest.fail("the cache was not read"))
    cached = SpritesSource(tmp_path / "a", **SMALL).load()
    for data in (again, cached):
        assert torch.equal(data.images, made.images) and torch.equal(data.factors, made.factors)
        assert torch.equal(data.labels, made.labels)


def test_the_seed_draws_the_subsample_and_the_cache_name_holds_every_setting(tmp_path, small):
    def subsample(seed: int) -> SourceData:
        return SpritesSource(tmp_path, **SMALL, num_images=100, seed=seed).load()

    first, same, other = subsample(0), subsample(0), subsample(1)
    assert torch.equal(first.images, same.images) and torch.equal(first.factors, same.factors)
    assert not torch.equal(first.factors, other.factors)
    assert len(set(map(tuple, first.factors.tolist()))) == 100
    # a drawn image is the whole grid's image of its factors: rendering a subset changes no pixels
    assert torch.equal(by_factors(small)[tuple(first.factors.T)], first.images[:, 0].float() / 255)

    variants = [
        {},
        {"image_size": 48},
        {"scales": 2},
        {"orientations": 5},
        {"positions": 4},
        {"num_images": 100},
        {"num_images": 100, "seed": 1},
        {"num_images": 99},
        {"full": True},
    ]
    names = {SpritesSource(tmp_path, **(SMALL | change)).identity for change in variants}
    assert len(names) == len(variants)
    # the seed picks nothing from the whole grid: the same images, the same cache file
    assert SpritesSource(tmp_path, **SMALL, seed=5).identity == SpritesSource(tmp_path, **SMALL).identity
    assert SpritesSource(tmp_path, full=True).identity == SpritesSource(tmp_path, **DSPRITES).identity


DSPRITES = {"image_size": 64, "scales": 6, "orientations": 40, "positions": 32}


def test_full_is_the_dsprites_grid_whatever_the_other_settings_say(tmp_path):
    full = SpritesSource(tmp_path, image_size=20, scales=2, orientations=3, positions=4, full=True)
    assert full.image_size == 64 and full.factor_sizes == (3, 6, 40, 32, 32)
    assert math.prod(full.factor_sizes) == 737_280


def test_the_centroid_moves_with_pos_x_and_pos_y_only(small):
    x, y = centroid(by_factors(small))  # each [shape, scale, orientation, pos_x, pos_y]
    assert (x.diff(dim=POS_X) > 0).all() and (y.diff(dim=POS_Y) > 0).all()
    assert (x.diff(dim=POS_Y) == 0).all() and (y.diff(dim=POS_X) == 0).all()  # whole-pixel moves: the same shape
    # square and ellipse are symmetric about their centre, which moves from 7.5 to 23.5 in steps of 4 pixels
    symmetric = x[[SQUARE, ELLIPSE]]
    expected = 7.5 + 4 * torch.arange(5.0)
    torch.testing.assert_close(symmetric, expected.view(1, 1, 1, 5, 1).expand_as(symmetric))


def test_the_area_grows_with_scale_and_matches_the_closed_form(small):
    area = by_factors(small).sum((-1, -2))
    assert (area.diff(dim=SCALE) > 0).all()
    # squares and ellipses of circumradius 32 pixels: areas 2 r^2 and pi r^2 / 2, within half a pixel per boundary pixel
    r = 32
    areas = render_templates(2 * r, np.array([1.0]), np.array([0.0, 0.3, 1.0]))[:2, 0].sum((-1, -2)) / 255
    perimeter = {SQUARE: 4 * math.sqrt(2) * r, ELLIPSE: math.pi * (3 * 1.5 * r - math.sqrt(3.5 * r * 2.5 * r))}
    for shape, exact in ((SQUARE, 2 * r**2), (ELLIPSE, math.pi * r**2 / 2)):
        assert np.abs(areas[shape] - exact).max() <= perimeter[shape] / 2


def test_a_quarter_turn_keeps_a_square_and_turns_an_ellipse_and_a_half_turn_flips_a_heart(small):
    grid = by_factors(small)  # orientations 0, 90, 180, 270 degrees
    squares, ellipses, hearts = grid[SQUARE], grid[ELLIPSE], grid[HEART]
    assert torch.equal(squares[:, 1], squares[:, 0]) and torch.equal(squares[:, 2], squares[:, 0])
    assert torch.equal(ellipses[:, 2], ellipses[:, 0])  # symmetric about its centre

    def extent(white: torch.Tensor, dim: int) -> torch.Tensor:  # how many columns (dim -2) or rows (-1) hold white
        return (white.sum(dim) > 0).sum(-1)

    width, height = extent(ellipses, -2), extent(ellipses, -1)
    assert (width[:, 0] > height[:, 0]).all() and (width[:, 1] < height[:, 1]).all()  # lying, then standing
    torch.testing.assert_close(width[:, 1], height[:, 0])
    # upright, a heart's lobes hold most of its area: its centroid lies above its centre; upside down, below; turned
    # a quarter counterclockwise, its tip points right and its centroid lies left of its centre
    x, y = centroid(hearts)
    centre = 7.5 + 4 * torch.arange(5.0)
    assert (y[:, 0] < centre).all() and (y[:, 2] > centre).all()
    assert (x[:, 1] < centre.view(5, 1)).all() and (x[:, 3] > centre.view(5, 1)).all()


def test_the_three_shapes_differ_at_every_scale_orientation_and_position(small):
    grid = by_factors(small)
    for a, b in ((SQUARE, ELLIPSE), (SQUARE, HEART), (ELLIPSE, HEART)):
        assert (grid[a] != grid[b]).flatten(-2).any(-1).all()
    upright = grid[:, :, 0, 0, 0].sum((-1, -2))  # shape x scale
    assert (upright[ELLIPSE] < upright[SQUARE]).all() and (upright[SQUARE] < upright[HEART]).all()


def symmetric_position(white: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pos_x, pos_y) of centrally symmetric shapes in SMALL images, read off their centroids."""
    x, y = centroid(white)
    return ((x - 7.5) / 4).round().long(), ((y - 7.5) / 4).round().long()


@pytest.mark.parametrize("labels_per_class", [None, 5])
def test_every_split_keeps_its_images_factors(tmp_path, small, labels_per_class):
    few = {"labels_per_class": labels_per_class, "val_labels_per_class": labels_per_class}  # as conf/data sets them
    dm = ImageDataModule(SpritesSource(tmp_path, **SMALL), **few, binarize="dynamic")
    dm.setup()
    assert dm.factor_names == FACTOR_NAMES and dm.factor_sizes == (3, 3, 4, 5, 5)
    factors_of = {}  # image bytes -> the factor rows of the source that give that image (a turned square repeats)
    for image, row in zip(small.images, small.factors.tolist(), strict=True):
        factors_of.setdefault(image.numpy().tobytes(), set()).add(tuple(row))
    sizes = {}
    for split in ("train", "val", "test", "full_train"):
        images, labels = dm.real_split(split)
        factors = dm.factors(split)
        sizes[split] = len(factors)
        assert factors.shape == (len(images), 5) and torch.equal(labels, factors[:, SHAPE])
        if split != "full_train":  # what the model sees has the same factors
            assert torch.equal(getattr(dm, f"{split}_set").factors, factors)
        for image, row in zip((images * 255).to(torch.uint8), factors.tolist(), strict=True):
            assert tuple(row) in factors_of[image.numpy().tobytes()]
        symmetric = factors[:, SHAPE] != HEART
        pos_x, pos_y = symmetric_position(images[symmetric, 0])
        assert torch.equal(pos_x, factors[symmetric, POS_X]) and torch.equal(pos_y, factors[symmetric, POS_Y])
        if split != "full_train":  # binarising binary pixels leaves them as they are
            assert torch.equal(dm.inputs(split), images)
    if labels_per_class is None:
        assert sizes["full_train"] + sizes["val"] + sizes["test"] == 900 and sizes["train"] == sizes["full_train"]
    else:
        assert sizes["train"] == sizes["val"] == 3 * labels_per_class


class Plain(Source):
    def load(self) -> SourceData:
        return SourceData(torch.randint(0, 256, (40, 1, 4, 4), dtype=torch.uint8), torch.arange(40) % 2, 2)


def test_data_without_factors_has_none():
    dm = ImageDataModule(Plain(), binarize="static")
    dm.setup()
    assert all(dm.factors(split) is None for split in ("train", "val", "test", "full_train"))
    assert dm.factor_names == () and dm.factor_sizes == () and dm.train_set.factors is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"positions": 0}, "positions=0 is not a positive whole number"),
        ({"scales": -1}, "scales=-1 is not a positive whole number"),
        ({"orientations": 2.5}, "orientations=2.5 is not a positive whole number"),
        ({"image_size": 8}, "image_size=8 is too small for the shapes"),
        ({"positions": 18}, "positions=18 does not fit data.source.image_size=32.*at most data.source.positions=17"),
        ({"num_images": 0}, "num_images=0 is not a whole number between 1 and the 900 images"),
        ({"num_images": 901}, "num_images=901 is not a whole number between 1 and the 900 images"),
        ({"num_images": 10.5}, "num_images=10.5 is not a whole number between 1 and the 900 images"),
    ],
)
def test_bad_settings_are_user_errors_that_name_the_value(tmp_path, change, message):
    with pytest.raises(UserError, match=message):
        SpritesSource(tmp_path, **(SMALL | change))


def test_the_config_makes_the_default_grid_with_a_bernoulli_likelihood(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOENCODERS_CACHE", str(tmp_path))
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", ["data=sprites"])
    source = instantiate(cfg.data).source
    assert isinstance(source, SpritesSource) and source.cache_dir == tmp_path and source.image_size == 32
    assert source.factor_sizes == (3, 6, 8, 12, 12) and math.prod(source.factor_sizes) == 20_736
    assert for_data(cfg.model.likelihood, cfg.data.binarize) == "bernoulli"


DISENTANGLEMENT = {"mig", "dci_disentanglement", "dci_completeness", "dci_informativeness", "sap", "factorvae_score"}


def test_a_tiny_run_on_sprites_trains_and_evaluate_py_scores_its_disentanglement(tmp_path):
    grid = ["data.source.orientations=2", "data.source.positions=4"]  # 288 images
    run = [*TINY, "data=sprites", *grid, "model=conv_vae", "model.widths=[8,16]", "latent_dim=4", "logger=csv"]
    metrics = train(compose_train(tmp_path / "run", *run))
    assert {"val/elbo", "test/elbo", "test/nll"} <= metrics.keys()
    assert all(math.isfinite(value) for value in metrics.values())
    datamodule, model = build(compose_train(tmp_path / "again", *run))
    assert datamodule.image_shape == (1, 32, 32) and model.hparams.likelihood == "bernoulli"
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", [f"ckpt_path={ckpt}", "data=sprites", *grid, "k=5",
                                   "num_samples=0", "samplers=[prior]", f"cache_dir={tmp_path}"])  # fmt: skip
    (scores,) = evaluate(cfg)
    assert {f"test/{name}" for name in DISENTANGLEMENT} <= scores.keys()
    assert all(0 <= scores[f"test/{name}"] <= 1 for name in DISENTANGLEMENT)
