"""DINOHead: shapes, layer structure, initialisation and the weight-normalised prototype layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dinolab.config import HeadConfig
from dinolab.models.head import DINOHead

CONFIGS = {
    "three_layers": HeadConfig(out_dim=64, hidden_dim=48, bottleneck_dim=16),
    "five_layers_layernorm": HeadConfig(out_dim=100, hidden_dim=40, bottleneck_dim=12,
                                        num_layers=5, norm="layer"),
    "batchnorm": HeadConfig(out_dim=32, hidden_dim=24, bottleneck_dim=8, norm="batch"),
    "one_layer": HeadConfig(out_dim=10, hidden_dim=24, bottleneck_dim=8, num_layers=1),
}


def _linears(head: DINOHead) -> list[nn.Linear]:
    return [module for module in head.mlp if isinstance(module, nn.Linear)]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_output_shape_and_mlp_widths(name: str) -> None:
    config, in_dim, batch = CONFIGS[name], 20, 6
    head = DINOHead(in_dim, config)
    out = head(torch.randn(batch, in_dim))
    assert out.shape == (batch, config.out_dim)
    assert torch.isfinite(out).all()

    linears = _linears(head)
    assert len(linears) == config.num_layers
    widths = [(layer.in_features, layer.out_features) for layer in linears]
    hidden = [config.hidden_dim] * (config.num_layers - 1)
    assert widths == list(zip([in_dim] + hidden, hidden + [config.bottleneck_dim], strict=True))
    assert not isinstance(head.mlp[-1], (nn.GELU, nn.LayerNorm, nn.BatchNorm1d)), \
        "no activation or norm after the bottleneck"
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == config.num_layers - 1
    norm_type = {"layer": nn.LayerNorm, "batch": nn.BatchNorm1d}.get(config.norm)
    norms = [m for m in head.mlp if isinstance(m, (nn.LayerNorm, nn.BatchNorm1d))]
    if norm_type is None:
        assert norms == []
    else:
        assert len(norms) == config.num_layers - 1
        assert all(isinstance(m, norm_type) for m in norms)
    assert head.last_layer.bias is None
    assert head.last_layer.weight.shape == (config.out_dim, config.bottleneck_dim)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_linear_init(name: str) -> None:
    torch.manual_seed(0)
    head = DINOHead(20, CONFIGS[name])
    for layer in _linears(head):
        assert torch.count_nonzero(layer.bias) == 0
        # truncated normal, std 0.02 (PyTorch's default init would give ~1/sqrt(3 * fan_in))
        assert 0.01 < layer.weight.std().item() < 0.03


def test_logits_are_cosines_with_unit_prototypes() -> None:
    """The bottleneck is L2-normalised and each prototype has unit norm, so |logit| <= 1."""
    head = DINOHead(20, CONFIGS["three_layers"])
    out = head(1000 * torch.randn(8, 20))
    assert out.abs().max() <= 1 + 1e-5


def _row_norms(head: DINOHead) -> torch.Tensor:
    return head.last_layer.weight.detach().norm(dim=1)


def _magnitude(head: DINOHead) -> nn.Parameter:
    return head.last_layer.parametrizations.weight.original0


def _optimizer_steps(head: DINOHead, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=0.1,
                                  weight_decay=0.5)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        out = head(torch.randn(16, 20, generator=generator))
        target = torch.randn(out.shape, generator=generator)
        loss = ((out - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_norm_last_layer_keeps_unit_prototypes_through_training() -> None:
    head = DINOHead(20, HeadConfig(out_dim=50, hidden_dim=32, bottleneck_dim=16,
                                   norm_last_layer=True))
    assert _magnitude(head).requires_grad is False
    torch.testing.assert_close(_row_norms(head), torch.ones(50))
    direction_before = head.last_layer.parametrizations.weight.original1.detach().clone()
    _optimizer_steps(head)
    # the prototypes did move, but every row still has unit norm
    assert not torch.equal(head.last_layer.parametrizations.weight.original1, direction_before)
    torch.testing.assert_close(_row_norms(head), torch.ones(50))
    assert _magnitude(head).grad is None


def test_without_norm_last_layer_the_magnitude_is_trainable() -> None:
    head = DINOHead(20, HeadConfig(out_dim=50, hidden_dim=32, bottleneck_dim=16,
                                   norm_last_layer=False))
    magnitude = _magnitude(head)
    assert magnitude.requires_grad is True
    assert any(parameter is magnitude for parameter in head.parameters())
    torch.testing.assert_close(_row_norms(head), torch.ones(50))  # starts at 1 either way
    _optimizer_steps(head)
    assert magnitude.grad is not None
    assert not torch.allclose(_row_norms(head), torch.ones(50))
