"""Attention maps agree with timm's own (unfused) attention, the 60% masks are minimal, the PCA
picture finds a planted foreground, and every picture is a PNG of the promised size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from dinolab.config import ConfigError, DataConfig
from dinolab.data.datasets import ArrayImages, Sources
from dinolab.data.transforms import EvalTransform
from dinolab.training.monitor import Metrics
from dinolab.visualization import pca
from dinolab.visualization.attention import (
    check_attention_backbone,
    cls_attention,
    cls_attention_over_tokens,
    mass_mask,
    write_attention_maps,
)
from dinolab.visualization.monitor import log_attention_maps
from dinolab.visualization.pca import foreground_mask, pca_colours, write_feature_maps
from dinolab.visualization.rendering import colorize, grid

# (timm name, keywords): plain, with register tokens and q/k norm, and the DINOv2-with-registers
# family (LayerScale, 4 registers), all shrunk to a few thousand parameters.
VITS = {
    "plain": ("vit_tiny_patch16_224", {}),
    "registers_qk_norm": ("vit_tiny_patch16_224", {"reg_tokens": 4, "qk_norm": True}),
    "dinov2_registers": ("vit_small_patch14_reg4_dinov2", {}),
}


def tiny_vit(name: str = "vit_tiny_patch16_224", **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=0, depth=2, embed_dim=32, num_heads=2,
                              img_size=32, patch_size=8, dynamic_img_size=True, **kwargs)
    with torch.no_grad():  # random weights far from the near-uniform initialisation
        for parameter in model.parameters():
            parameter.normal_(0, 0.5)
        if hasattr(model.blocks[-1].attn.q_norm, "weight"):  # normed queries: sharpen them
            model.blocks[-1].attn.q_norm.weight.mul_(10)
    return model.eval()


def timm_unfused_cls_rows(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The reference: timm's own eager attention (softmax materialised), row 0 of [B, H, N, N]."""
    attention = model.blocks[-1].attn
    probabilities: list[torch.Tensor] = []
    attention.fused_attn = False
    hook = attention.attn_drop.register_forward_hook(
        lambda module, inputs, output: probabilities.append(output))
    try:
        with torch.no_grad():
            model.forward_features(images)
    finally:
        hook.remove()
        attention.fused_attn = True
    return probabilities[-1][:, :, 0, :]


@pytest.mark.parametrize("variant", list(VITS))
def test_cls_attention_equals_timm_unfused_attention(variant: str) -> None:
    name, kwargs = VITS[variant]
    model = tiny_vit(name, **kwargs)
    images = torch.randn(2, 3, 32, 40)  # not square: the grid is 4 x 5
    rows = cls_attention_over_tokens(model, images)
    reference = timm_unfused_cls_rows(model, images)
    assert rows.shape == (2, 2, model.num_prefix_tokens + 20)
    torch.testing.assert_close(rows, reference, rtol=1e-5, atol=1e-6)
    assert rows.max() > 3 / rows.shape[-1], "the test needs attention far from uniform"


@pytest.mark.parametrize("variant", list(VITS))
def test_patch_maps_are_the_rows_without_prefix_tokens(variant: str) -> None:
    """Rows over all tokens sum to 1; a map over patches sums to 1 minus the prefix mass."""
    name, kwargs = VITS[variant]
    model = tiny_vit(name, **kwargs)
    images = torch.randn(2, 3, 32, 40)
    rows = cls_attention_over_tokens(model, images)
    maps = cls_attention(model, images)
    prefix = model.num_prefix_tokens
    assert maps.shape == (2, 2, 4, 5)
    torch.testing.assert_close(rows.sum(-1), torch.ones(2, 2))
    torch.testing.assert_close(maps.sum((-2, -1)), 1 - rows[..., :prefix].sum(-1))
    torch.testing.assert_close(maps.flatten(-2), rows[..., prefix:])


def test_backbones_without_cls_attention_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"\[CLS\]"):
        check_attention_backbone(timm.create_model("test_resnet", num_classes=0))
    no_cls = timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=1, embed_dim=32,
                               num_heads=2, img_size=32, class_token=False, global_pool="avg")
    with pytest.raises(ConfigError, match="not one"):
        check_attention_backbone(no_cls)


def test_mass_mask_by_hand() -> None:
    shares = torch.tensor([[0.1, 0.5], [0.1, 0.3]])
    assert mass_mask(shares, 0.6).tolist() == [[False, True], [False, True]]
    assert mass_mask(shares, 0.5).tolist() == [[False, True], [False, False]]
    assert mass_mask(shares * 7, 0.6).tolist() == [[False, True], [False, True]]  # any scale


@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.9])
def test_mass_mask_keeps_the_threshold_with_the_fewest_patches(threshold: float) -> None:
    maps = torch.rand(3, 4, 6, 7) ** 4  # [B, H, h, w], skewed like attention
    mask = mass_mask(maps, threshold)
    total = maps.sum((-2, -1))
    kept = (maps * mask).sum((-2, -1))
    assert (kept >= threshold * total - 1e-6).all()
    # Fewest: the same number of largest patches minus one holds less than the threshold.
    counts = mask.sum((-2, -1))
    largest = maps.flatten(-2).sort(dim=-1, descending=True).values.cumsum(-1)
    without_one = largest.gather(-1, (counts - 2).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert (without_one < threshold * total).all()
    # And the kept patches are the largest ones.
    smallest_kept = torch.where(mask, maps, torch.inf).flatten(-2).min(-1).values
    largest_dropped = torch.where(mask, -torch.inf, maps).flatten(-2).max(-1).values
    assert (smallest_kept >= largest_dropped).all()


def test_mass_mask_refuses_a_threshold_outside_0_1() -> None:
    with pytest.raises(ConfigError, match="--threshold"):
        mass_mask(torch.rand(2, 2), 1.5)


def write_images(folder: Path, count: int = 2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = folder / f"image{index}.png"
        Image.fromarray(rng.integers(0, 255, (40 + index, 50, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_attention_pngs_open_with_the_input_size(tmp_path: Path) -> None:
    model = tiny_vit(reg_tokens=4)
    written = write_attention_maps(model, None, write_images(tmp_path / "in"), tmp_path / "out",
                                   threshold=0.6, size=48)
    names = {path.name for path in written}
    for stem in ("image0", "image1"):
        for map_name in ("mean", "head0", "head1"):
            assert f"{stem}_attention_{map_name}.png" in names
            assert f"{stem}_attention_{map_name}_overlay.png" in names
    for path in written:
        with Image.open(path) as picture:
            # 48 px inputs are shown 4x enlarged. The grid: input, mean, mean overlay, 2 heads
            # in each of 2 rows, 2 px gaps.
            expected = (5 * 192 + 4 * 2, 2 * 192 + 2) if path.name == "attention_grid.png" \
                else (192, 192)
            assert picture.size == expected, path.name
            assert picture.mode == "RGB"


def test_size_must_be_a_multiple_of_the_patch(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="multiple of the patch size 8"):
        write_attention_maps(tiny_vit(), None, write_images(tmp_path), tmp_path, size=30)


def planted_features(height: int, width: int, inner: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images of [h, w, D=16] features: an object (one direction + noise) inside, background
    (another direction + noise) around it. -> (features [2, h, w, 16], object mask [2, h, w])."""
    generator = torch.Generator().manual_seed(0)
    obj, background = torch.randn(2, 16, generator=generator) * 3
    truth = torch.zeros(2, height, width, dtype=torch.bool)
    truth[:, inner, inner] = True
    features = torch.where(truth[..., None], obj, background)
    return features + 0.3 * torch.randn(features.shape, generator=generator), truth


@pytest.mark.parametrize("sign", [1, -1])  # a principal direction's sign is arbitrary
@pytest.mark.parametrize("inner", [slice(2, 4), slice(1, 5)])  # a small and a large object
def test_foreground_mask_recovers_a_planted_object(monkeypatch: pytest.MonkeyPatch, inner: slice,
                                                   sign: int) -> None:
    fitted = pca.principal_components
    monkeypatch.setattr(pca, "principal_components",
                        lambda features, count: sign * fitted(features, count))
    features, truth = planted_features(6, 6, inner)
    assert torch.equal(foreground_mask(features), truth)


def test_pca_colours_are_black_behind_and_span_0_1_in_front() -> None:
    features, truth = planted_features(6, 6, slice(1, 5))
    features = features + truth[..., None] * torch.randn(features.shape)  # varied foreground
    colours = pca_colours(features, truth)
    assert colours.shape == (2, 6, 6, 3)
    assert (colours[~truth] == 0).all()
    assert torch.allclose(colours[truth].min(0).values, torch.zeros(3))
    assert torch.allclose(colours[truth].max(0).values, torch.ones(3))


@pytest.mark.parametrize("backbone", ["vit", "cnn"])
def test_feature_pngs_open_with_the_input_size(tmp_path: Path, backbone: str) -> None:
    model = (tiny_vit() if backbone == "vit"
             else timm.create_model("test_resnet", num_classes=0).eval())
    written = write_feature_maps(model, None, write_images(tmp_path / "in", 3), tmp_path / "out",
                                 size=64)
    assert sorted(path.name for path in written) == [
        "features_grid.png", "image0_features.png", "image1_features.png", "image2_features.png"]
    for path in written:
        with Image.open(path) as picture:
            grid_size = (3 * 192 + 2 * 2, 3 * 192 + 2 * 2)  # 64 px shown 3x enlarged
            assert picture.size == (grid_size if path.name == "features_grid.png"
                                    else (192, 192))


def test_colorize_and_grid() -> None:
    picture = colorize(torch.tensor([[0.0, 1.0], [2.0, 4.0]]))
    assert picture.shape == (2, 2, 3) and picture.dtype == np.uint8
    assert picture[0, 0].tolist() == [68, 1, 84] and picture[1, 1].tolist() == [253, 231, 37]
    tiles = grid([[picture, picture], [picture]], gap=1)
    assert tiles.shape == (5, 5, 3)
    assert (tiles[3:, 3:] == 255).all()  # the missing tile is background


def test_attention_monitor_writes_tensorboard_images(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rng = np.random.default_rng(0)
    images = ArrayImages(rng.integers(0, 255, (10, 28, 28), dtype=np.uint8), np.arange(10))
    sources = Sources(train=images, knn_train=images, knn_test=images)
    transform = EvalTransform(DataConfig(global_crop_size=32))
    model = tiny_vit()
    model.train()
    metrics = Metrics(tmp_path, tensorboard=True)
    log_attention_maps(metrics, model, sources, transform, step=7)
    log_attention_maps(metrics, timm.create_model("test_resnet", num_classes=0), sources,
                       transform, step=8)  # a CNN: nothing, and no error
    metrics.close()
    assert model.training, "the monitor restores the backbone's mode"
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    logged = events.Images("attention")
    assert [event.step for event in logged] == [7]  # one grid: 4 images x (input, 2 + 2 maps)
    assert (logged[0].width, logged[0].height) == (5 * 224 + 4 * 2, 4 * 224 + 3 * 2)  # 7 x 32
