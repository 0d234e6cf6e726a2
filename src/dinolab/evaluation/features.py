"""Feature extraction for evaluation: L2-normalised backbone features of un-augmented images."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from dinolab.data.transforms import EvalTransform


class _Transformed(Dataset):
    def __init__(self, images: Dataset, transform: EvalTransform) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.images[index]
        return self.transform(image), label


def fixed_subset(dataset: Dataset, limit: int, seed: int = 0) -> Dataset:
    """A fixed random subset of ``limit`` items (the whole set when limit is 0 or larger)."""
    size = len(dataset)  # type: ignore[arg-type]
    if limit <= 0 or limit >= size:
        return dataset
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, sorted(order[:limit].tolist()))


@torch.no_grad()
def extract_features(backbone: nn.Module, images: Dataset, transform: EvalTransform,
                     device: torch.device, batch_size: int = 256, num_workers: int = 0,
                     autocast_dtype: torch.dtype | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (features [N, D] L2-normalised float32 on CPU, labels [N])."""
    was_training = backbone.training
    backbone.eval()
    # The loader's own generator leaves the global RNG (drop path) untouched.
    loader = DataLoader(_Transformed(images, transform), batch_size=batch_size,
                        num_workers=num_workers, generator=torch.Generator())
    features, labels = [], []
    for batch, batch_labels in loader:
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            output = backbone(batch.to(device, non_blocking=True))
        features.append(F.normalize(output.float(), dim=-1).cpu())
        labels.append(batch_labels)
    backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)
