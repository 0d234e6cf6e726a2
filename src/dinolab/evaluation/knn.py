"""Weighted k-NN classification (Wu et al., 2018, as used by DINO, Sec. 4.1).

For each test feature, the k most cosine-similar train features vote for their label with
weight exp(similarity / T). Features are L2-normalised, so the similarity is a dot product.
Test features are processed in chunks so that the [chunk, N_train] similarity matrix bounds
memory, whatever the number of train features.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor,
                test_features: torch.Tensor, num_classes: int, k: int = 20,
                temperature: float = 0.07, chunk_size: int = 1024) -> torch.Tensor:
    """-> class scores [N_test, num_classes]. features: [N, D], L2-normalised."""
    k = min(k, train_features.shape[0])
    scores = []
    for start in range(0, test_features.shape[0], chunk_size):
        similarity = test_features[start : start + chunk_size] @ train_features.T  # [c, N_train]
        top_similarity, top_index = similarity.topk(k, dim=1)  # [c, k]
        weights = (top_similarity / temperature).exp()
        votes = torch.zeros(similarity.shape[0], num_classes, dtype=weights.dtype,
                            device=weights.device)
        votes.scatter_add_(1, train_labels[top_index], weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor,
                 test_features: torch.Tensor, test_labels: torch.Tensor, k: int = 20,
                 temperature: float = 0.07) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
    ranked = scores.topk(min(5, num_classes), dim=1).indices
    hits = ranked == test_labels[:, None]
    return {
        "top1": 100.0 * hits[:, 0].float().mean().item(),
        "top5": 100.0 * hits.any(dim=1).float().mean().item(),
    }
