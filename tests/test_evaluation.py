"""Evaluation protocols against independent implementations: weighted k-NN against a plain
Python loop, the batched linear probe against each learning rate trained alone, the probe's
block features against a shallower copy of the network."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch.nn import functional as F

from dinolab.evaluation.features import block_features
from dinolab.evaluation.knn import knn_accuracies, knn_accuracy, knn_predict
from dinolab.evaluation.linear import (
    ProbeSettings,
    cosine_learning_rate,
    linear_probe,
    train_linear,
)


def _random_features(count: int, width: int, classes: int, seed: int,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(count, width, generator=generator, dtype=torch.float64),
                           dim=1)
    return features, torch.randint(0, classes, (count,), generator=generator)


def _brute_force_knn(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
                     test_labels: torch.Tensor, k: int, temperature: float,
                     classes: int) -> tuple[float, float]:
    """Weighted k-NN (DINO_SPEC.md) with Python lists and loops only: (top-1 %, top-5 %)."""
    train_rows, test_rows = train.tolist(), test.tolist()
    top1 = top5 = 0
    for row, label in zip(test_rows, test_labels.tolist(), strict=True):
        similarity = [sum(a * b for a, b in zip(row, other, strict=True)) for other in train_rows]
        nearest = sorted(range(len(train_rows)), key=lambda j: -similarity[j])[:k]
        votes = [0.0] * classes
        for j in nearest:
            votes[int(train_labels[j])] += math.exp(similarity[j] / temperature)
        ranked = sorted(range(classes), key=lambda c: -votes[c])
        top1 += ranked[0] == label
        top5 += label in ranked[:5]
    return 100 * top1 / len(test_rows), 100 * top5 / len(test_rows)


# (train images, test images, classes, ks): one test image; k beyond the train set; 3 classes
CASES = [(40, 12, 3, (1, 10, 20)), (40, 1, 3, (5, 20)), (7, 9, 3, (5, 20, 200)),
         (60, 25, 8, (10, 20))]


@pytest.mark.parametrize(("num_train", "num_test", "classes", "ks"), CASES)
def test_knn_matches_a_brute_force_loop(num_train: int, num_test: int, classes: int,
                                        ks: tuple[int, ...]) -> None:
    train, train_labels = _random_features(num_train, 6, classes, seed=1)
    test, test_labels = _random_features(num_test, 6, classes, seed=2)
    results = knn_accuracies(train, train_labels, test, test_labels, ks, 0.07, classes)
    for k in ks:
        expected = _brute_force_knn(train, train_labels, test, test_labels, k, 0.07, classes)
        assert (results[k]["top1"], results[k]["top5"]) == pytest.approx(expected), k


def test_knn_in_chunks_equals_one_chunk() -> None:
    train, train_labels = _random_features(50, 8, 5, seed=3)
    test, test_labels = _random_features(23, 8, 5, seed=4)
    whole = knn_predict(train, train_labels, test, 5, k=10, chunk_size=1000)
    for chunk_size in (1, 4, 7):
        assert torch.allclose(knn_predict(train, train_labels, test, 5, 10, 0.07, chunk_size),
                              whole)
        chunked = knn_accuracies(train, train_labels, test, test_labels, (3, 10), 0.07, 5,
                                 chunk_size)
        assert chunked == knn_accuracies(train, train_labels, test, test_labels, (3, 10), 0.07, 5)


def test_knn_votes_are_the_weighted_sum_over_neighbours() -> None:
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.0]])
    scores = knn_predict(train, labels, test, num_classes=2, k=2, temperature=0.5)
    assert torch.allclose(scores, torch.tensor([[math.exp(2.0), math.exp(1.6)]]))
    assert knn_accuracy(train, labels, test, torch.tensor([0]), k=2)["top1"] == 100.0


def _separable(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(4, 12) * 4
    labels = torch.randint(0, 4, (count,), generator=generator)
    return centres[labels] + 0.5 * torch.randn(count, 12, generator=generator), labels


def test_linear_probe_separates_separable_features() -> None:
    train_features, train_labels = _separable(400, seed=0)
    test_features, test_labels = _separable(200, seed=1)
    result = linear_probe(train_features, train_labels, test_features, test_labels,
                          ProbeSettings(epochs=10))
    assert result.test_top1 > 95
    assert result.best_learning_rate in result.learning_rates
    assert len(result.validation_top1) == len(result.learning_rates)


def test_linear_probe_fails_on_random_labels() -> None:
    """The probe can fail: with labels unrelated to the features it stays near chance."""
    train_features, _ = _separable(400, seed=0)
    test_features, _ = _separable(400, seed=1)
    generator = torch.Generator().manual_seed(5)
    train_labels, test_labels = (torch.randint(0, 4, (400,), generator=generator)
                                 for _ in range(2))
    result = linear_probe(train_features, train_labels, test_features, test_labels,
                          ProbeSettings(epochs=10))
    assert result.test_top1 < 40


def test_learning_rates_trained_at_once_equal_each_trained_alone() -> None:
    features, labels = _separable(100, seed=2)
    rates = (0.01, 0.3, 1.0)
    settings = ProbeSettings(learning_rates=rates, epochs=3, batch_size=32)
    weight, bias = train_linear(features, labels, 4, settings)
    for index, rate in enumerate(rates):
        alone = ProbeSettings(learning_rates=(rate,), epochs=3, batch_size=32)
        single_weight, single_bias = train_linear(features, labels, 4, alone)
        assert torch.allclose(weight[index], single_weight[0], atol=1e-6)
        assert torch.allclose(bias[index], single_bias[0], atol=1e-6)
    assert not torch.allclose(weight[0], weight[1])


def test_sgd_step_is_pytorchs() -> None:
    """One layer, one rate: the hand-written momentum SGD equals torch.optim.SGD."""
    features, labels = _separable(64, seed=3)
    settings = ProbeSettings(learning_rates=(0.1,), epochs=2, batch_size=64)
    weight, bias = train_linear(features, labels, 4, settings)
    generator = torch.Generator().manual_seed(settings.seed)
    layer = torch.nn.Linear(12, 4)
    with torch.no_grad():
        layer.weight.copy_((torch.randn(12, 4, generator=generator) * 0.01).T)
        layer.bias.zero_()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(2):
        for group in optimizer.param_groups:
            group["lr"] = cosine_learning_rate(0.1, epoch, 2)
        torch.randperm(64, generator=generator)  # the probe's shuffle: one batch, any order
        optimizer.zero_grad()
        F.cross_entropy(layer(features), labels).backward()
        optimizer.step()
    assert torch.allclose(weight[0], layer.weight.T, atol=1e-6)
    assert torch.allclose(bias[0], layer.bias, atol=1e-6)


def _tiny_vit(depth: int) -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=28, patch_size=7,
                             depth=depth, embed_dim=32, num_heads=2, reg_tokens=2,
                             dynamic_img_size=True).eval()


@torch.no_grad()
def test_block_features_are_the_cls_of_the_last_blocks() -> None:
    torch.manual_seed(0)
    deep = _tiny_vit(3)
    shallow = _tiny_vit(2)  # the first 2 blocks of ``deep`` with its final norm
    shallow.load_state_dict({k: v for k, v in deep.state_dict().items()
                             if not k.startswith("blocks.2.")})
    images = torch.randn(2, 3, 28, 28)
    features = block_features(deep, 2, average_patches=True)(images)
    width = deep.num_features
    assert features.shape == (2, 3 * width)
    assert torch.allclose(features[:, :width], shallow(images), atol=1e-5)
    assert torch.allclose(features[:, width : 2 * width], deep(images), atol=1e-5)
    tokens = deep.forward_features(images)  # final-normed; 1 [CLS] + 2 registers first
    assert torch.allclose(features[:, 2 * width :], tokens[:, 3:].mean(1), atol=1e-5)
    assert block_features(deep, 1, average_patches=False) is deep
