"""Feature extraction for evaluation: backbone features of un-augmented images.

k-NN reads the backbone's output (the final-normed [CLS] token of a ViT, the pooled feature of
a CNN), L2-normalised. The linear probe reads more of a ViT (DINO_SPEC.md, "Evaluation
protocols"): the [CLS] token of each of the last n blocks, each through the final norm as the
reference's ``get_intermediate_layers`` does, concatenated, and optionally the mean of the last
block's patch tokens (registers and other prefix tokens excluded).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from dinolab.config import ConfigError
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


def block_features(backbone: nn.Module, blocks: int, average_patches: bool,
                   ) -> Callable[[torch.Tensor], torch.Tensor]:
    """images [B, C, H, W] -> [B, blocks * D (+ D)]: [CLS] of the last ``blocks`` blocks, then
    the mean patch token of the last block. One block without patches is the backbone's own
    output, for any model; more needs a transformer with timm's ``forward_intermediates``."""
    if blocks == 1 and not average_patches:
        return backbone
    prefix_tokens = getattr(backbone, "num_prefix_tokens", 0)
    if not prefix_tokens or not hasattr(backbone, "forward_intermediates"):
        raise ConfigError(f"{type(backbone).__name__} has no [CLS] token: the linear probe "
                          "reads one block (--blocks 1) without --avgpool")
    depth = len(backbone.blocks)  # type: ignore[arg-type]
    if not 1 <= blocks <= depth:
        raise ConfigError(f"--blocks must be in 1..{depth} for this backbone, not {blocks}")

    def forward(images: torch.Tensor) -> torch.Tensor:
        outputs = backbone.forward_intermediates(  # type: ignore[operator]
            images, indices=blocks, return_prefix_tokens=True, norm=True, output_fmt="NLC",
            intermediates_only=True)  # [(patches [B, N, D], prefix [B, P, D]), ...]
        parts = [prefix[:, 0] for _, prefix in outputs]
        if average_patches:
            parts.append(outputs[-1][0].mean(dim=1))
        return torch.cat(parts, dim=-1)

    return forward


@torch.no_grad()
def extract_features(backbone: nn.Module, images: Dataset, transform: EvalTransform,
                     device: torch.device, batch_size: int = 256, num_workers: int = 0,
                     autocast_dtype: torch.dtype | None = None,
                     forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (features [N, D] float32 on CPU, L2-normalised unless ``normalize`` is false,
    labels [N]). ``forward`` replaces the backbone's own call (see ``block_features``)."""
    was_training = backbone.training
    backbone.eval()
    # The loader's own generator leaves the global RNG (drop path) untouched.
    loader = DataLoader(_Transformed(images, transform), batch_size=batch_size,
                        num_workers=num_workers, generator=torch.Generator())
    features, labels = [], []
    for batch, batch_labels in loader:
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            output = (forward or backbone)(batch.to(device, non_blocking=True)).float()
        features.append((F.normalize(output, dim=-1) if normalize else output).cpu())
        labels.append(batch_labels)
    backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)
