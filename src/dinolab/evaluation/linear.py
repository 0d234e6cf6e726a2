"""Linear probe on frozen features (Caron et al., 2021, Sec. 4.1; DINO_SPEC.md, "Evaluation
protocols").

As the reference: one linear layer on frozen features (ViTs: the [CLS] tokens of the last
blocks, see ``features.block_features``), SGD with momentum 0.9 and no weight decay, a cosine
learning rate per epoch, 100 epochs, the learning rate swept.

Departures, each for speed or honesty:
- The features are extracted once, from un-augmented center crops, and cached. The reference
  runs the frozen backbone on RandomResizedCrop + flip augmented images every epoch; that costs
  a backbone forward per image per epoch and usually gains a little accuracy.
- Every learning rate trains at once on the same batches: one linear layer per rate, stacked as
  a weight [L, D, C]. Their parameters are disjoint, so summing their losses gives each layer
  exactly the gradient it would get alone.
- The learning rate is chosen on a fixed 10% of the train features held out for it, and only
  the chosen one is reported on the test split (the reference reports the best on the test
  split, ImageNet's validation set).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
VALIDATION_FRACTION = 0.1


@dataclass(frozen=True)
class ProbeSettings:
    learning_rates: tuple[float, ...] = LEARNING_RATES
    epochs: int = 100
    batch_size: int = 256
    momentum: float = 0.9
    seed: int = 0


@dataclass(frozen=True)
class ProbeResult:
    learning_rates: tuple[float, ...]
    validation_top1: tuple[float, ...]  # one per learning rate, in percent
    best_learning_rate: float
    test_top1: float
    test_top5: float


def cosine_learning_rate(base: float, epoch: int, epochs: int) -> float:
    """The reference's per-epoch cosine from ``base`` down to 0."""
    return base * 0.5 * (1 + math.cos(math.pi * epoch / epochs))


def stacked_logits(features: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor) -> torch.Tensor:
    """features [B, D], weight [L, D, C], bias [L, C] -> logits [L, B, C]."""
    stacked = features.unsqueeze(0).expand(weight.shape[0], -1, -1)
    return torch.baddbmm(bias.unsqueeze(1), stacked, weight)


def train_linear(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 settings: ProbeSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """features [N, D], labels [N] -> (weight [L, D, C], bias [L, C]), one layer per LR.

    Every layer starts from the same draw (normal, std 0.01, bias 0, as the reference) and sees
    the same batches, so it ends exactly where it would if trained alone."""
    generator = torch.Generator().manual_seed(settings.seed)
    count, width = features.shape
    num_rates = len(settings.learning_rates)
    initial = torch.randn(width, num_classes, generator=generator) * 0.01
    weight = initial.to(features.device).expand(num_rates, -1, -1).clone().requires_grad_()
    bias = torch.zeros(num_rates, num_classes, device=features.device, requires_grad=True)
    buffers = [torch.zeros_like(weight), torch.zeros_like(bias)]
    for epoch in range(settings.epochs):
        rates = torch.tensor([cosine_learning_rate(rate, epoch, settings.epochs)
                              for rate in settings.learning_rates], device=features.device)
        order = torch.randperm(count, generator=generator).to(features.device)
        for start in range(0, count, settings.batch_size):
            batch = order[start : start + settings.batch_size]
            logits = stacked_logits(features[batch], weight, bias)  # [L, b, C]
            # Sum over the L layers of each one's batch-mean loss: disjoint gradients.
            loss = F.cross_entropy(logits.flatten(0, 1), labels[batch].repeat(num_rates),
                                   reduction="sum") / len(batch)
            gradients = torch.autograd.grad(loss, [weight, bias])
            with torch.no_grad():  # SGD with momentum (PyTorch's rule), per-layer LR
                for parameter, buffer, gradient in zip([weight, bias], buffers, gradients,
                                                       strict=True):
                    buffer.mul_(settings.momentum).add_(gradient)
                    shape = (num_rates,) + (1,) * (parameter.dim() - 1)
                    parameter.sub_(rates.view(shape) * buffer)
    return weight.detach(), bias.detach()


def top_accuracies(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [L, N, C] -> (top-1 [L], top-5 [L]) in percent."""
    ranked = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # [L, N, 5]
    hits = ranked == labels.view(1, -1, 1)
    return 100 * hits[..., 0].float().mean(1), 100 * hits.any(-1).float().mean(1)


def validation_split(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train index, validation index): a fixed 10% (at least one image) for choosing the LR."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    held_out = max(1, int(count * VALIDATION_FRACTION))
    return order[held_out:], order[:held_out]


@torch.no_grad()
def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor,
                 test_features: torch.Tensor, test_labels: torch.Tensor,
                 settings: ProbeSettings, num_classes: int | None = None) -> ProbeResult:
    """Train one layer per LR on 90% of the train features, choose the LR on the other 10%,
    report it on the test features. Features [N, D] unnormalised, on any one device."""
    if train_features.shape[0] < 2:
        raise ValueError("the linear probe needs at least 2 train images")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    fit, held_out = validation_split(train_features.shape[0], settings.seed)
    fit, held_out = fit.to(train_features.device), held_out.to(train_features.device)
    with torch.enable_grad():
        weight, bias = train_linear(train_features[fit], train_labels[fit], num_classes,
                                    settings)
    validation_top1, _ = top_accuracies(
        stacked_logits(train_features[held_out], weight, bias), train_labels[held_out])
    best = int(validation_top1.argmax())
    test_top1, test_top5 = top_accuracies(
        stacked_logits(test_features, weight[best : best + 1], bias[best : best + 1]),
        test_labels)
    return ProbeResult(
        learning_rates=settings.learning_rates,
        validation_top1=tuple(validation_top1.tolist()),
        best_learning_rate=settings.learning_rates[best],
        test_top1=float(test_top1[0]), test_top5=float(test_top5[0]),
    )
