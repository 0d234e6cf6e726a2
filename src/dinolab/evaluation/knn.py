"""Weighted k-NN classification (Wu et al., 2018, as used by DINO, Sec. 4.1).

For each test feature, the k most cosine-similar train features vote for their label with
weight exp(similarity / T). Features are L2-normalised, so the similarity is a dot product.
Test features are processed in chunks so that the [chunk, N_train] similarity matrix stays under
a fixed number of elements, whatever the number of train features (a million train features
give chunks of 64 test images). The neighbours are found once for the largest k; every smaller
k reads a prefix of the same sorted list.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

SIMILARITY_ELEMENTS = 2**26  # one chunk's similarity matrix: 256 MB in float32


def chunk_rows(num_train: int, budget: int = SIMILARITY_ELEMENTS) -> int:
    """Test images per chunk so that [rows, num_train] holds at most ``budget`` elements."""
    return max(1, budget // max(1, num_train))


def nearest_neighbours(train_features: torch.Tensor, test_features: torch.Tensor, k: int,
                       chunk_size: int | None = None,
                       ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per chunk of test images: (similarity [c, k], train index [c, k]), most similar first.
    ``k`` is clamped to the number of train features."""
    k = min(k, train_features.shape[0])
    rows = chunk_size or chunk_rows(train_features.shape[0])
    for start in range(0, test_features.shape[0], rows):
        similarity = test_features[start : start + rows] @ train_features.T  # [c, N_train]
        yield similarity.topk(k, dim=1)


def vote(top_similarity: torch.Tensor, top_labels: torch.Tensor, num_classes: int,
         temperature: float) -> torch.Tensor:
    """[c, k] similarities and labels of the neighbours -> class scores [c, num_classes]."""
    weights = (top_similarity / temperature).exp()
    votes = torch.zeros(top_similarity.shape[0], num_classes, dtype=weights.dtype,
                        device=weights.device)
    return votes.scatter_add_(1, top_labels, weights)


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor,
                test_features: torch.Tensor, num_classes: int, k: int = 20,
                temperature: float = 0.07, chunk_size: int | None = None) -> torch.Tensor:
    """-> class scores [N_test, num_classes]. features: [N, D], L2-normalised."""
    scores = [vote(similarity, train_labels[index], num_classes, temperature)
              for similarity, index in nearest_neighbours(train_features, test_features, k,
                                                          chunk_size)]
    return torch.cat(scores)


def _top1_top5(scores: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """Hits (counts, not percent) of the top class and of the 5 top classes."""
    ranked = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return int(hits[:, 0].sum()), int(hits.any(dim=1).sum())


@torch.no_grad()
def knn_accuracies(train_features: torch.Tensor, train_labels: torch.Tensor,
                   test_features: torch.Tensor, test_labels: torch.Tensor,
                   ks: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07,
                   num_classes: int | None = None, chunk_size: int | None = None,
                   ) -> dict[int, dict[str, float]]:
    """{k: {"top1": %, "top5": %}} for every k, from one neighbour search for the largest k.
    A k larger than the train set counts every train image (as k = N_train)."""
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    hits = {k: [0, 0] for k in ks}
    start = 0
    for similarity, index in nearest_neighbours(train_features, test_features, max(ks),
                                                chunk_size):
        labels = test_labels[start : start + similarity.shape[0]]
        start += similarity.shape[0]
        neighbour_labels = train_labels[index]
        for k in ks:
            scores = vote(similarity[:, :k], neighbour_labels[:, :k], num_classes, temperature)
            top1, top5 = _top1_top5(scores, labels)
            hits[k][0] += top1
            hits[k][1] += top5
    count = test_features.shape[0]
    return {k: {"top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count}
            for k, (top1, top5) in hits.items()}


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor,
                 test_features: torch.Tensor, test_labels: torch.Tensor, k: int = 20,
                 temperature: float = 0.07) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent for one k (the training loop's monitor)."""
    return knn_accuracies(train_features, train_labels, test_features, test_labels, (k,),
                          temperature)[k]
