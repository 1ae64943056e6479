"""A k-nearest-neighbour vote among labelled codes: the `knn` classifier's method and the probe callback's."""

import torch
import torch.nn.functional as F
from torch import Tensor


def knn_vote(codes: Tensor, bank_codes: Tensor, bank_labels: Tensor, k: int, num_classes: int) -> Tensor:
    """Per class, the share of the similarity-weighted votes of each code's `k` most cosine-similar labelled codes
    (`bank_codes`, `bank_labels`), shape (B, num_classes); a neighbour's vote is its non-negative cosine similarity."""
    similarity = F.normalize(codes, dim=1) @ F.normalize(bank_codes, dim=1).T
    top, index = similarity.topk(min(k, len(bank_labels)), dim=1)
    votes = torch.zeros(len(codes), num_classes, device=codes.device)
    votes.scatter_add_(1, bank_labels[index], top.clamp_min(0) + 1e-6)
    return votes / votes.sum(1, keepdim=True)
