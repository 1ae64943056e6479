"""Disentanglement metrics of codes (N, D) against the discrete ground-truth factors (N, K) that generated the data
(e.g. dSprites' shape x scale x orientation x posX x posY): MIG, DCI, SAP and the FactorVAE score.

Each is a pure function of the given points, following disentanglement_lib (Locatello et al., 2019) and its
unsupervised-study settings where nothing else is said. `factors` holds integer value indices; a factor with a single
value carries no information about anything, so every metric skips it (it would divide MIG by a zero entropy and give
DCI and SAP a column of nothing to predict). Points are split at random (seeded) into 2/3 to fit and 1/3 to score on,
disentanglement_lib's 10,000 : 5,000. Arrays may be numpy or torch (converted with np.asarray).
"""

from typing import Any

import numpy as np
from sklearn.ensemble import ExtraTreesClassifier
from sklearn.metrics import mutual_info_score
from sklearn.tree import DecisionTreeClassifier

TRAIN_FRACTION = 2 / 3
MIG_BINS = 20
COLLAPSED_SCALE = 0.05  # FactorVAE: a dim whose std is below this fraction of the largest dim's std has collapsed


def mig(codes: Any, factors: Any) -> float:
    """Mutual Information Gap (Chen et al., 2018): per factor, the mutual information of the best code dim minus the
    second best's, over the factor's entropy; the mean over factors. Each code dim is discretised into 20 equal-width
    bins over its range, as disentanglement_lib's histogram discretizer does."""
    codes, factors = _checked(codes, factors)
    binned = _equal_width_bins(codes, MIG_BINS)
    information = np.array([[mutual_info_score(factor, dim) for factor in factors.T] for dim in binned.T])
    entropy = np.array([mutual_info_score(factor, factor) for factor in factors.T])
    return _mean_gap_of_top_two(information / entropy)


def dci(codes: Any, factors: Any, seed: int = 0) -> dict[str, float]:
    """Disentanglement, completeness and informativeness (Eastwood & Williams, 2018) from one classifier per factor.

    The classifier is an extremely randomised forest (20 trees over all dims, leaves of at least 5 points) instead of
    disentanglement_lib's gradient boosted trees: like them it is non-linear (a factor such as orientation is not a
    linear function of a good code) and its mean impurity decrease per dim is the importance matrix, with no extra
    passes (permutation importances would predict the held-out points once per dim); but its trees are independent
    and cut at random thresholds: 0.2 s instead of 23 s to fit a 12-valued factor on 6,667 points of a 10-dim code.
    Informativeness is the mean held-out accuracy over factors (a random code scores their majority-class rates).
    Disentanglement weights each dim by its share of the total importance, as in the paper."""
    codes, factors = _checked(codes, factors)
    train, test = _split(len(codes), seed)
    importance = np.zeros((codes.shape[1], factors.shape[1]))
    accuracies = []
    for k, factor in enumerate(factors.T):
        forest = ExtraTreesClassifier(n_estimators=20, max_features=None, min_samples_leaf=5, random_state=seed)
        forest.fit(codes[train], factor[train])
        importance[:, k] = forest.feature_importances_
        accuracies.append(forest.score(codes[test], factor[test]))
    disentanglement, completeness = disentanglement_and_completeness(importance)
    return {
        "disentanglement": disentanglement,
        "completeness": completeness,
        "informativeness": float(np.mean(accuracies)),
    }


def disentanglement_and_completeness(importance: np.ndarray) -> tuple[float, float]:
    """DCI's disentanglement and completeness of an importance matrix (D code dims, K factors), >= 0.

    Disentanglement: 1 - the entropy (base K) of each dim's importance over the factors, weighted by the dim's share
    of the total importance. Completeness: 1 - the entropy (base D) of each factor's importance over the dims, weighted
    by the factor's share. A row or column of zeros counts as uniform; an all-zero matrix scores 0 on both."""
    importance = np.asarray(importance, dtype=np.float64)
    if importance.ndim != 2 or (importance < 0).any():
        raise ValueError(f"importance must be a non-negative (D, K) matrix, got shape {importance.shape}")
    total = importance.sum()
    disentanglement = _one_minus_normalised_entropy(importance) @ _shares(importance.sum(1), total)
    completeness = _one_minus_normalised_entropy(importance.T) @ _shares(importance.sum(0), total)
    return float(disentanglement), float(completeness)


def sap(codes: Any, factors: Any, seed: int = 0) -> float:
    """Separated Attribute Predictability (Kumar et al., 2018) for discrete factors: the held-out accuracy of a
    classifier of each factor from each single code dim, and per factor the best dim's accuracy minus the second
    best's; the mean over factors.

    The 1-D classifier is a decision tree (leaves of at least 10 points), not disentanglement_lib's linear SVM: a
    linear one-vs-rest classifier of one scalar can only pick out the values at the ends of the dim's range, so even a
    perfect code of a 12-valued position scores about 0.2 accuracy with it; a tree cuts the dim into intervals."""
    codes, factors = _checked(codes, factors)
    train, test = _split(len(codes), seed)
    accuracy = np.array(
        [
            [
                DecisionTreeClassifier(min_samples_leaf=10, random_state=seed)
                .fit(dim[train, None], factor[train])
                .score(dim[test, None], factor[test])
                for factor in factors.T
            ]
            for dim in codes.T
        ]
    )
    return _mean_gap_of_top_two(accuracy)


def factor_vae_score(codes: Any, factors: Any, seed: int = 0, votes: int = 15_000, batch: int = 64) -> float:
    """The FactorVAE metric (Kim & Mnih, 2018) from the given points instead of a generator.

    Codes are divided by their std over all points and dims whose std is below 5% of the largest dim's std are dropped
    as collapsed (disentanglement_lib drops std < 0.05, which is the same for VAE codes with active dims of std ~1;
    relative, it also suits plain autoencoders' codes of any scale). Each vote picks a factor at random, the value of
    a random point (one whose value at least one other point shares) and `batch` points with that value (drawn with
    replacement), and votes for the dim with the least variance among them. A majority vote dim -> factor is fitted to
    2/3 of the votes and the score is its accuracy on the rest. As published, it is reported as is: a code
    independent of the factors scores the chance level 1/K (K varying factors), not 0; a code with no active dim 0."""
    codes, factors = _checked(codes, factors)
    if votes < 2 or batch < 2:
        raise ValueError(f"factor_vae_score needs votes >= 2 and batch >= 2, got votes={votes}, batch={batch}")
    scale = codes.std(0, ddof=1)
    active = scale > COLLAPSED_SCALE * scale.max()
    if not active.any():
        return 0.0
    normalised = codes[:, active] / scale[active]
    rng = np.random.default_rng(seed)
    voted_factor = rng.integers(factors.shape[1], size=votes)
    voted_dim = np.empty(votes, dtype=np.int64)
    for k, factor in enumerate(factors.T):
        voters = np.flatnonzero(voted_factor == k)
        order = np.argsort(factor, kind="stable")
        _, starts, group_of_point, sizes = np.unique(
            factor[order], return_index=True, return_inverse=True, return_counts=True
        )
        shared = np.flatnonzero(sizes[group_of_point] >= 2)  # positions in `order` of points with a shared value
        if len(shared) == 0:
            raise ValueError(f"varying factor {k} has no value that two points share, so no vote can hold it fixed")
        group = group_of_point[rng.choice(shared, size=len(voters))]
        offsets = (rng.random((len(voters), batch)) * sizes[group, None]).astype(np.int64)
        members = order[starts[group, None] + offsets]
        for start in range(0, len(voters), 1024):  # 1,024 votes at a time: the gathered codes are (votes, batch, D)
            rows = slice(start, start + 1024)
            voted_dim[voters[rows]] = normalised[members[rows]].var(1, ddof=1).argmin(1)
    n_train = int(votes * TRAIN_FRACTION)
    counts = np.zeros((factors.shape[1], normalised.shape[1]), dtype=np.int64)
    np.add.at(counts, (voted_factor[:n_train], voted_dim[:n_train]), 1)
    factor_of_dim = counts.argmax(0)
    return float(np.mean(factor_of_dim[voted_dim[n_train:]] == voted_factor[n_train:]))


def disentanglement_metrics(codes: Any, factors: Any, seed: int = 0) -> dict[str, float]:
    """All of the above: `mig`, `dci_disentanglement`, `dci_completeness`, `dci_informativeness`, `sap` and
    `factorvae_score`."""
    codes, factors = _checked(codes, factors)
    scores = {"mig": mig(codes, factors)}
    scores.update({f"dci_{name}": value for name, value in dci(codes, factors, seed).items()})
    scores["sap"] = sap(codes, factors, seed)
    scores["factorvae_score"] = factor_vae_score(codes, factors, seed)
    return scores


def _checked(codes: Any, factors: Any) -> tuple[np.ndarray, np.ndarray]:
    """Codes as float64 (N, D) and the factors (N, K') that take more than one value."""
    codes, factors = (np.asarray(x.detach().cpu() if hasattr(x, "detach") else x) for x in (codes, factors))
    if codes.ndim != 2 or factors.ndim != 2 or len(codes) != len(factors):
        raise ValueError(f"codes (N, D) and factors (N, K) must have the same N, got {codes.shape}, {factors.shape}")
    if codes.shape[1] < 2 or len(codes) < 4:
        raise ValueError(f"disentanglement needs at least 2 code dims and 4 points, got codes of shape {codes.shape}")
    if not np.issubdtype(factors.dtype, np.integer):
        raise ValueError(f"factors must be integer value indices, got dtype {factors.dtype}")
    codes = codes.astype(np.float64)
    if not np.isfinite(codes).all():
        raise ValueError("codes contain NaN or infinite values")
    varying = (factors != factors[0]).any(0)
    if not varying.any():
        raise ValueError("every factor is constant: there is nothing for a code to disentangle")
    return codes, factors[:, varying]


def _split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random split of n points into TRAIN_FRACTION of them and the rest (datasets often list points in order)."""
    shuffled = np.random.default_rng(seed).permutation(n)
    n_train = int(n * TRAIN_FRACTION)
    return shuffled[:n_train], shuffled[n_train:]


def _equal_width_bins(codes: np.ndarray, bins: int) -> np.ndarray:
    """Each column's bin index 0..bins-1 among `bins` equal-width bins from its min to its max (all 0 if constant)."""
    low, high = codes.min(0), codes.max(0)
    width = np.where(high > low, (high - low) / bins, 1.0)
    return np.minimum(((codes - low) / width).astype(np.int64), bins - 1)


def _mean_gap_of_top_two(scores: np.ndarray) -> float:
    """The mean over factors (columns) of the highest score among the dims (rows) minus the second highest."""
    top_two = np.sort(scores, axis=0)[-2:]
    return float(np.mean(top_two[1] - top_two[0]))


def _one_minus_normalised_entropy(weights: np.ndarray) -> np.ndarray:
    """Per row, 1 - the entropy of its weights as a distribution, in base (row length): 1 for one-hot, 0 for uniform
    (and for a row of zeros); 1 for rows of length 1, which have no other outcome."""
    length = weights.shape[1]
    if length == 1:
        return np.ones(len(weights))
    sums = weights.sum(1, keepdims=True)
    p = np.where(sums > 0, weights / np.where(sums > 0, sums, 1), 1 / length)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0.0)
    return 1 + plogp.sum(1) / np.log(length)


def _shares(sums: np.ndarray, total: float) -> np.ndarray:
    return sums / total if total > 0 else np.full(len(sums), 1 / len(sums))
