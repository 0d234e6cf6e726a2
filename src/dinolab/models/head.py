"""The DINO projection head (Caron et al., 2021, Sec. 3.1 and Appendix).

An MLP maps the backbone feature to a bottleneck, which is L2-normalised and scored against K
prototypes by a weight-normalised linear layer without bias. With the defaults this is the
paper's head: Linear(d, 2048) -> GELU -> Linear(2048, 2048) -> GELU -> Linear(2048, 256), then
the 256 -> K prototype layer. ``num_layers=5, norm="layer", out_dim=1000`` gives the deeper
GELU + LayerNorm variant.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrizations

from dinolab.config import HeadConfig


def _norm(kind: str, width: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm1d(width)
    if kind == "layer":
        return nn.LayerNorm(width)
    return nn.Identity()


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, config: HeadConfig) -> None:
        super().__init__()
        widths = [in_dim] + [config.hidden_dim] * (config.num_layers - 1) + [config.bottleneck_dim]
        layers: list[nn.Module] = []
        for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers.append(nn.Linear(width_in, width_out))
            if index < config.num_layers - 1:  # no norm or activation after the bottleneck
                layers += [_norm(config.norm, width_out), nn.GELU()]
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init_linear)
        # Prototype layer: weight-normalised, PyTorch's default init, no bias. With
        # norm_last_layer the magnitude g is frozen at 1, so every prototype row has unit norm.
        last = nn.Linear(config.bottleneck_dim, config.out_dim, bias=False)
        self.last_layer = parametrizations.weight_norm(last)
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        if config.norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad = False

    @staticmethod
    def _init_linear(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: [B, D] -> logits [B, K]."""
        bottleneck = F.normalize(self.mlp(features), dim=-1, eps=1e-6)
        return self.last_layer(bottleneck)
