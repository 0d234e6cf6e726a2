"""Backbone factory: local weights files (safetensors or torch) and their mistakes, and a
backbone that cannot do what the configuration asks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dinolab import auto
from dinolab.config import Config, ConfigError, load_config
from dinolab.training.state import build_network

SMALL = ["model.backbone_kwargs={depth: 1, embed_dim: 32, num_heads: 2}"]


def _config(overrides: list[str]) -> Config:
    """The demo preset with ``overrides``, its auto keys resolved as for the demo's data."""
    return auto.resolve_for_preset(load_config(None, overrides), None)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_file_loads_into_the_backbone(tmp_path: Path, suffix: str) -> None:
    source = build_network(_config(SMALL), 0.0).backbone
    path = tmp_path / f"backbone{suffix}"
    state = {key: value.contiguous() for key, value in source.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    loaded = build_network(_config([*SMALL, f"model.weights={path}"]), 0.0).backbone
    fresh = build_network(_config(SMALL), 0.0).backbone
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                 source.state_dict().values(), strict=True))
    assert not torch.equal(fresh.pos_embed, source.pos_embed)  # not equal by chance


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    other = build_network(_config(["model.backbone=resnet10t"]), 0.0).backbone
    path = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(ConfigError, match="model.weights: .* does not fit"):
        build_network(_config([*SMALL, f"model.weights={path}"]), 0.0)


def test_missing_weights_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.weights: file not found"):
        build_network(_config([*SMALL, f"model.weights={tmp_path / 'no.pt'}"]), 0.0)


def test_unknown_backbone_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="model.backbone"):
        build_network(_config(["model.backbone=vit_nonexistent_patch3"]), 0.0)


@pytest.mark.parametrize("name", ["garbage.pt", "garbage.safetensors"])
def test_a_file_that_is_not_weights_is_a_config_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ConfigError, match="is not a weights file"):
        build_network(_config([*SMALL, f"model.weights={path}"]), 0.0)


def test_grad_checkpointing_of_a_backbone_without_it_is_a_config_error() -> None:
    """timm's DLA cannot recompute its blocks: the run stops before training, naming the key."""
    from dinolab.training.state import build_state

    config = _config(["model.backbone=dla34", "model.drop_path_rate=0",
                                "model.grad_checkpointing=true", "train.device=cpu",
                                "train.precision=fp32"])
    with pytest.raises(ConfigError, match="model.grad_checkpointing: timm's dla34 has no"):
        build_state(config)


def test_a_cnn_without_stochastic_depth_trains_with_drop_path_0(tmp_path: Path) -> None:
    """GhostNet has no drop_path_rate keyword: with model.drop_path_rate=0 the student and the
    teacher build, and the export's sidecar does not name the keyword; with the default 0.1
    the run stops before training, naming the key and the fix."""
    from dinolab.models.backbone import backbone_kwargs

    config = _config(["model.backbone=ghostnet_050", "model.drop_path_rate=0"])
    for rate in (config.model.drop_path_rate, 0.0):
        assert build_network(config, rate).backbone.num_features > 0
    assert "drop_path_rate" not in backbone_kwargs(config.model, 224, 0.0)
    assert backbone_kwargs(_config([]).model, 224, 0.0)["drop_path_rate"] == 0.0
    with pytest.raises(ConfigError, match="model.drop_path_rate: timm's ghostnet_050 has no "
                                          "stochastic depth .* set model.drop_path_rate=0"):
        build_network(_config(["model.backbone=ghostnet_050"]), 0.1)


def test_pretrained_without_released_weights_is_a_config_error() -> None:
    """timm would quietly start GhostNet-0.5 from random weights."""
    config = _config(["model.backbone=ghostnet_050", "model.drop_path_rate=0",
                                "model.pretrained=true"])
    with pytest.raises(ConfigError, match="model.pretrained: timm has no released weights for "
                                          "ghostnet_050"):
        build_network(config, 0.0)


def test_pretrained_weights_that_cannot_be_fetched_are_a_config_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline: one line with timm's reason and the way out, instead of the hub's traceback."""
    import timm

    def offline(name: str, pretrained: bool = False, **kwargs: object) -> torch.nn.Module:
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")

    monkeypatch.setattr(timm, "create_model", offline)
    config = _config([*SMALL, "model.pretrained=true"])
    with pytest.raises(ConfigError, match=r"model.pretrained: timm could not load the released "
                       r"weights of vit_tiny_patch16_224 \(We couldn't connect to "
                       r"'https://huggingface.co'.\); without network access, model.weights"):
        build_network(config, 0.0)


@pytest.mark.parametrize("backbone", ["swin_tiny_patch4_window7_224", "beit_base_patch16_224"])
def test_a_backbone_built_for_one_size_is_refused_before_training(backbone: str) -> None:
    """Swin (and BEiT, which has no dynamic_img_size) fail on the 96 px local crops: one line
    naming the key and the model's reason, instead of a shape error at the first step."""
    from dinolab.training.state import build_state

    config = auto.resolve_for_preset(load_config("imagenet_vit_small", [
        f"model.backbone={backbone}", "model.drop_path_rate=0", "train.device=cpu"]),
        "imagenet_vit_small")
    with pytest.raises(ConfigError, match=f"data.local_crop_size: timm's {backbone} does not "
                                          "take 96 px crops after 224 px ones .*doesn't match"):
        build_state(config)
