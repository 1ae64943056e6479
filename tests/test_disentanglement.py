"""Disentanglement metrics on constructed codes: closed forms, a brute-force mutual information, the bounds that
disentanglement_lib's own tests assert, and the order factors > partly mixed > rotated > random."""

import math
from collections import Counter

import numpy as np
import pytest
import torch

from autoencoders.disentanglement import (
    dci,
    disentanglement_and_completeness,
    disentanglement_metrics,
    factor_vae_score,
    mig,
    sap,
)

SIZES = (3, 6, 8, 12, 12)  # dSprites-like: shape, scale, orientation, posX, posY (orientation and positions fewer)


def uniform_factors(sizes: tuple[int, ...], n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(size, size=n) for size in sizes], 1)


def standardised(factors: np.ndarray) -> np.ndarray:
    return (factors - factors.mean(0)) / factors.std(0)


# disentanglement_lib's IdentityObservationsData: 10 factors of 10 uniform values, observed as they are; its metric
# tests (disentanglement_lib/evaluation/metrics/{mig,dci,sap_score,factor_vae}_test.py) use it as the code
@pytest.fixture(scope="module")
def identity_data() -> np.ndarray:
    return uniform_factors((10,) * 10, 2000)


def test_mig_of_disentanglement_libs_identity_zero_and_duplicated_codes(identity_data):
    # mig_test.py: identity -> [0.9, 1]; zeros -> [0, 0.2]; the code twice over -> [0, 0.1]
    codes = identity_data.astype(float)
    assert 0.9 <= mig(codes, identity_data) <= 1.0
    assert 0.0 <= mig(np.zeros_like(codes), identity_data) <= 0.2
    assert 0.0 <= mig(np.hstack([codes, codes]), identity_data) <= 0.1


def test_dci_of_disentanglement_libs_identity_permuted_and_duplicated_codes(identity_data):
    codes = identity_data.astype(float)
    identity = dci(codes, identity_data)
    assert 0.9 <= identity["disentanglement"] <= 1.0 and 0.9 <= identity["completeness"] <= 1.0
    # each point's code a random permutation of its factors: every dim equally important to every factor
    rng = np.random.default_rng(1)
    permuted = dci(np.array([rng.permutation(row) for row in codes]), identity_data)
    assert 0.0 <= permuted["disentanglement"] <= 0.2 and 0.0 <= permuted["completeness"] <= 0.2
    duplicated = dci(np.hstack([codes, codes]), identity_data)
    assert 0.9 <= duplicated["disentanglement"] <= 1.0
    # dci_test.py asserts 1 - log 2 / log 10 +- 0.1; with importance split evenly between the two copies among 20
    # dims the completeness is exactly 1 - log 2 / log 20 (0.769), inside that band
    target = 1 - math.log(2) / math.log(10)
    assert target - 0.1 <= duplicated["completeness"] <= target + 0.1
    assert duplicated["completeness"] == pytest.approx(1 - math.log(2) / math.log(20), abs=0.02)


def test_sap_of_disentanglement_libs_identity_zero_and_duplicated_codes(identity_data):
    codes = identity_data.astype(float)
    # sap_score_test.py asserts [0.9, 1] for identity with continuous factors (a squared correlation per pair); with
    # discrete factors the second-best dim still guesses the majority value, so the ceiling is 1 - its accuracy
    ceiling = 1 - np.mean([np.bincount(factor).max() / len(factor) for factor in identity_data.T])
    assert sap(codes, identity_data) == pytest.approx(ceiling, abs=0.02)
    assert 0.0 <= sap(np.zeros_like(codes), identity_data) <= 0.2
    assert 0.0 <= sap(np.hstack([codes, codes]), identity_data) <= 0.2


def test_factor_vae_score_of_disentanglement_libs_identity_and_zero_codes(identity_data):
    # factor_vae_test.py: identity -> [0.9, 1]; zeros -> [0, 0.2] (with no active dim we return 0, as it does)
    assert 0.9 <= factor_vae_score(identity_data.astype(float), identity_data) <= 1.0
    assert factor_vae_score(np.zeros(identity_data.shape), identity_data) == 0.0


# importance matrices (code dims x factors) and the (disentanglement, completeness) that dci_test.py asserts
DIAGONAL = np.diag(5.0 * np.ones(5))
IMPORTANCE_CASES = {
    "diagonal": (DIAGONAL, (1.0, 1.0)),
    "diagonal with an empty code": (np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), (1.0, 1.0)),
    "zero": (np.zeros((10, 10)), (0.0, 0.0)),
    "redundant codes": (np.vstack([DIAGONAL, DIAGONAL]), (1.0, 1 - math.log(2) / math.log(10))),
    "missed factors": (DIAGONAL[:2], (1.0, 1.0)),
    "one code two factors": (np.hstack([DIAGONAL, DIAGONAL]), (1 - math.log(2) / math.log(10), 1.0)),
}


@pytest.mark.parametrize("case", IMPORTANCE_CASES)
def test_disentanglement_and_completeness_of_disentanglement_libs_importance_matrices(case):
    importance, expected = IMPORTANCE_CASES[case]
    np.testing.assert_allclose(disentanglement_and_completeness(importance), expected, atol=1e-7)


def entropy_by_counting(labels: list) -> float:
    return -sum(c / len(labels) * math.log(c / len(labels)) for c in Counter(labels).values())


def information_by_counting(a: list, b: list) -> float:
    """I(a; b) = sum over the contingency table of p(x, y) log(p(x, y) / (p(x) p(y))), in nats."""
    n, joint, count_a, count_b = len(a), Counter(zip(a, b, strict=True)), Counter(a), Counter(b)
    return sum(c / n * math.log(c * n / (count_a[x] * count_b[y])) for (x, y), c in joint.items())


def test_mig_matches_a_brute_force_count_of_binned_codes():
    rng = np.random.default_rng(3)
    factors = uniform_factors((4, 3), 600, seed=3)
    codes = np.column_stack(
        [factors[:, 0] + rng.normal(0, 0.7, 600), factors[:, 1] + rng.normal(0, 0.3, 600), rng.normal(0, 1, 600)]
    )
    # bins from numpy's histogram edges, as disentanglement_lib's histogram discretizer cuts them
    binned = [np.digitize(dim, np.histogram(dim, 20)[1][:-1]).tolist() for dim in codes.T]
    gaps = []
    for factor in factors.T.tolist():
        information = sorted(information_by_counting(dim, factor) for dim in binned)
        gaps.append((information[-1] - information[-2]) / entropy_by_counting(factor))
    assert mig(codes, factors) == pytest.approx(np.mean(gaps), rel=1e-9)


def test_mig_of_a_code_with_known_mutual_informations():
    # every (f0, f1) pair of a 4 x 2 grid 25 times; dim 0 = f0 (I = log 4), dim 1 = f0 // 2 (log 2), dim 2 = f1
    factors = np.tile(np.array([(a, b) for a in range(4) for b in range(2)]), (25, 1))
    codes = np.column_stack([factors[:, 0], factors[:, 0] // 2, factors[:, 1]]).astype(float)
    # f0: (log 4 - log 2) / log 4 = 1/2; f1: (log 2 - 0) / log 2 = 1
    assert mig(codes, factors) == pytest.approx(0.75, abs=1e-12)


def test_factor_vae_score_of_a_code_that_misses_a_factor():
    # dims: f0, f1 and noise; votes for f2 find no dim fixed and land on any of the 3 dims alike, so the majority
    # vote maps dim 0 -> f0, dim 1 -> f1, dim 2 -> f2 and is right for f0, f1 and a third of f2: 7/9
    factors = uniform_factors((5, 5, 5), 3000)
    codes = np.column_stack([factors[:, :2], np.random.default_rng(1).normal(size=3000)])
    assert factor_vae_score(codes, factors) == pytest.approx(7 / 9, abs=0.03)


def test_factor_vae_score_ignores_constant_dims_and_lies_at_chance_for_a_random_code():
    factors = uniform_factors(SIZES, 2000)
    assert factor_vae_score(np.column_stack([factors, np.full(2000, 3.0), 1e-9 * factors[:, 0]]), factors) == 1.0
    random_code = np.random.default_rng(1).normal(size=(2000, 8))
    assert factor_vae_score(random_code, factors) == pytest.approx(1 / len(SIZES), abs=0.03)


def rotation(dim: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    return q * np.sign(np.diag(r))


def pairs_mixed(dim: int, angle: float) -> np.ndarray:
    """Rotates dims (0, 1), (2, 3), ... by `angle` within each pair: each dim mostly one factor, partly another."""
    mix = np.eye(dim)
    for i in range(0, dim - 1, 2):
        mix[i : i + 2, i : i + 2] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    return mix


@pytest.fixture(scope="module")
def scores_by_code() -> dict[str, dict[str, float]]:
    factors = uniform_factors(SIZES, 2000)
    code = standardised(factors)
    rng = np.random.default_rng(1)
    codes = {
        "factors": code + 0.01 * rng.normal(size=code.shape),
        "pairs mixed": code @ pairs_mixed(len(SIZES), math.pi / 6).T,
        "rotated": code @ rotation(len(SIZES), seed=2).T,
        "random": rng.normal(size=code.shape),
    }
    return {name: disentanglement_metrics(code, factors) for name, code in codes.items()} | {
        "sap ceiling": {"sap": 1 - np.mean([np.bincount(factor).max() / len(factor) for factor in factors.T])}
    }


def test_the_factors_as_the_code_score_about_1(scores_by_code):
    scores = scores_by_code["factors"]
    assert scores["factorvae_score"] == 1.0 and scores["dci_informativeness"] == 1.0
    for name in ("mig", "dci_disentanglement", "dci_completeness"):
        assert 0.97 <= scores[name] <= 1.0, name
    # its best possible value: the second-best dim of a perfect code still guesses each factor's commonest value
    assert scores["sap"] == pytest.approx(scores_by_code["sap ceiling"]["sap"], abs=0.02)


def test_a_random_code_scores_about_0_and_chance_on_the_factor_vae_score(scores_by_code):
    scores = scores_by_code["random"]
    for name in ("mig", "dci_disentanglement", "dci_completeness", "sap"):
        assert 0.0 <= scores[name] <= 0.03, name
    assert scores["factorvae_score"] == pytest.approx(1 / len(SIZES), abs=0.05)
    assert scores["dci_informativeness"] < 0.25  # held-out accuracy of guessing: 1/3 of shapes, 1/12 of positions


@pytest.mark.parametrize(
    "name", ["mig", "dci_disentanglement", "dci_completeness", "dci_informativeness", "sap", "factorvae_score"]
)
def test_scores_fall_as_the_code_mixes_factors(scores_by_code, name):
    factors, mixed, rotated, random = (
        scores_by_code[code][name] for code in ("factors", "pairs mixed", "rotated", "random")
    )
    # mixing each dim 3:1 (30 degrees) leaves every factor predictable and every dim's largest part one factor's, which
    # is all that informativeness and the FactorVAE score (argmin-variance dim per factor) look at
    if name in ("dci_informativeness", "factorvae_score"):
        assert mixed == pytest.approx(factors)
    else:
        assert factors > mixed + 0.05
    # a random rotation spreads every factor over all dims, yet some dims keep more of one factor than chance would
    assert mixed > rotated + 0.05 and rotated > random + 0.01


def test_constant_factors_are_skipped():
    factors = uniform_factors(SIZES, 600)
    codes = standardised(factors) + 0.3 * np.random.default_rng(1).normal(size=factors.shape)
    with_constants = np.column_stack([np.zeros(600, dtype=int), factors, np.full(600, 4)])
    assert disentanglement_metrics(codes, with_constants) == disentanglement_metrics(codes, factors)


def test_torch_tensors_score_like_numpy_arrays():
    factors = uniform_factors(SIZES, 600)
    codes = standardised(factors) + 0.3 * np.random.default_rng(1).normal(size=factors.shape)
    from_torch = disentanglement_metrics(torch.tensor(codes, requires_grad=True), torch.from_numpy(factors))
    assert from_torch == pytest.approx(disentanglement_metrics(codes.astype(np.float32), factors))


@pytest.mark.parametrize(
    "codes, factors, match",
    [
        (np.zeros((10, 3)), np.zeros((9, 2), dtype=int), "same N"),
        (np.zeros(10), np.zeros((10, 2), dtype=int), "same N"),
        (np.zeros((10, 1)), np.arange(20).reshape(10, 2), "at least 2 code dims"),
        (np.zeros((10, 3)), np.zeros((10, 2)), "integer"),
        (np.full((10, 3), np.nan), np.arange(20).reshape(10, 2), "NaN"),
        (np.zeros((10, 3)), np.ones((10, 2), dtype=int), "constant"),
    ],
)
def test_bad_arrays_raise_value_errors(codes, factors, match):
    with pytest.raises(ValueError, match=match):
        disentanglement_metrics(codes, factors)
