"""MultiCropNetwork: the grouped forward (one backbone call per resolution) equals running each
view on its own, and the output is view-major (DINO_SPEC.md, Teacher, student, views)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from torch import nn

from dinolab import auto
from dinolab.config import Config, ConfigError, load_config
from dinolab.models.multicrop import MultiCropNetwork, resolution_groups
from dinolab.training.state import build_network


def _views(batch: int, sizes: list[int], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=generator) for size in sizes]


def _tiny_vit_config(tmp_path: Path) -> Config:
    return load_config(None, tiny_overrides(tmp_path / "data", tmp_path / "run"))


def _per_view(network: MultiCropNetwork, views: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([network.head(network.backbone(view)) for view in views])


def test_resolution_groups_splits_consecutive_sizes() -> None:
    views = _views(2, [28, 28, 14, 14, 14])
    groups = resolution_groups(views)
    assert [len(group) for group in groups] == [2, 3]
    assert all(a is b for a, b in zip(groups[0] + groups[1], views, strict=True))  # order kept
    assert [len(g) for g in resolution_groups(_views(2, [28, 28]))] == [2]
    # only consecutive runs are merged: a size that comes back starts a new group
    assert [len(g) for g in resolution_groups(_views(1, [28, 14, 28, 28]))] == [1, 1, 2]
    assert [len(g) for g in resolution_groups(_views(1, [32, 16, 16]))] == [1, 2]


class _CountingBackbone(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.batch_sizes: list[int] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(images.shape[0])
        return self.backbone(images)


def test_grouped_forward_equals_per_view_forward_vit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = _tiny_vit_config(tmp_path)
    assert (config.data.global_crop_size, config.data.local_crop_size) == (28, 14)
    network = build_network(config, drop_path_rate=0.0).eval()
    batch, out_dim = 4, config.model.head.out_dim
    views = _views(batch, [28, 28, 14, 14, 14])

    counting = _CountingBackbone(network.backbone)
    grouped_network = MultiCropNetwork(counting, network.head).eval()
    with torch.no_grad():
        grouped = grouped_network(views)
        per_view = _per_view(network, views)
    assert counting.batch_sizes == [2 * batch, 3 * batch]  # one backbone call per resolution
    assert grouped.shape == (5 * batch, out_dim)
    assert grouped.dtype == torch.float32
    torch.testing.assert_close(grouped, per_view, rtol=1e-5, atol=1e-5)
    # view-major: rows [v * B, (v + 1) * B) are view v of the whole batch; views differ
    assert not torch.allclose(grouped[:batch], grouped[batch : 2 * batch])
    # the teacher's call (global views only) gives the first 2 * B rows of the student's
    with torch.no_grad():
        torch.testing.assert_close(network(views[:2]), grouped[: 2 * batch], rtol=1e-5,
                                   atol=1e-5)


# ResNet; MobileNetV3 and GhostNet, whose pre-logits layer widens the pooled features (the head
# takes timm's head_hidden_size, not num_features); GhostNet has no drop path either.
@pytest.mark.parametrize("backbone", ["resnet10t", "mobilenetv3_small_050", "ghostnet_050"])
def test_cnn_backbone_through_the_same_path(tmp_path: Path, backbone: str) -> None:
    torch.manual_seed(0)
    # A YAML base instead of the demo preset, whose ViT backbone_kwargs a CNN does not take.
    base = tmp_path / "cnn.yaml"
    base.write_text(f"model:\n  backbone: {backbone}\n")
    overrides = [item for item in tiny_overrides(tmp_path / "data", tmp_path / "run")
                 if not item.startswith(("model.backbone", "model.patch_size"))]
    overrides += ["data.global_crop_size=32", "data.local_crop_size=16"]
    config = load_config(str(base), overrides)
    assert config.model.backbone == backbone and config.model.backbone_kwargs == {}
    network = build_network(config, drop_path_rate=0.0).eval()
    batch, out_dim = 2, config.model.head.out_dim
    views = _views(batch, [32, 32, 16, 16])
    with torch.no_grad():
        grouped = network(views)
        per_view = _per_view(network, views)
    assert grouped.shape == (4 * batch, out_dim)
    assert torch.isfinite(grouped).all()
    torch.testing.assert_close(grouped, per_view, rtol=1e-5, atol=1e-5)


def test_readme_cnn_example_builds_on_the_demo_preset(tmp_path: Path) -> None:
    config = load_config(None, ["method=dino", "data.source=folder", f"data.root={tmp_path}",
                                "model.backbone=resnet18", "data.global_crop_size=128",
                                "data.local_crop_size=64", "model.backbone_kwargs={}"])
    config = auto.resolve_for_preset(config, None)
    network = build_network(config, drop_path_rate=0.0).eval()
    with torch.no_grad():
        out = network(_views(1, [128, 64]))
    assert out.shape == (2, config.model.head.out_dim)


def test_train_mode_keeps_gradients_to_the_backbone(tmp_path: Path) -> None:
    network = build_network(_tiny_vit_config(tmp_path), drop_path_rate=0.0).train()
    out = network(_views(2, [28, 28, 14]))
    out.sum().backward()
    grads = [p.grad for p in network.backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


@pytest.mark.parametrize(("override", "key"), [
    ("data.global_crop_size=32", "data.global_crop_size"),
    ("data.local_crop_size=10", "data.local_crop_size"),
])
def test_crop_not_a_multiple_of_the_patch_is_a_config_error(override: str, key: str) -> None:
    config = load_config(None, ["model.patch_size=7", "model.head.out_dim=64", override])
    with pytest.raises(ConfigError, match=key):
        build_network(config, drop_path_rate=0.0)
