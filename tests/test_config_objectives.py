"""The objective's keys are validated before any work, with a message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dinolab.config import ConfigError, load_config


@pytest.mark.parametrize(("overrides", "key"), [
    (["method=simclr"], "method"),
    (["method=dino", "loss.koleo_weight=0.1"], "loss.koleo_weight"),  # DINOv2's term, DINO
    (["method=byol", "loss.ibot_weight=1.0"], "loss.ibot_weight"),
    (["method=dinov2", "loss.koleo_weight=-1"], "loss.koleo_weight"),
    (["method=dinov2", "loss.centering=softmax"], "loss.centering"),
    (["method=byol", "loss.centering=sinkhorn"], "loss.centering"),
    (["method=dinov2", "data.mask_ratio=[0.5,0.1]"], "data.mask_ratio"),
    (["method=dinov2", "data.mask_probability=1.5"], "data.mask_probability"),
    (["model.num_registers=-1"], "model.num_registers"),
    (["optim.freeze_last_layer_by=weights"], "optim.freeze_last_layer_by"),
])
def test_invalid_objective_keys_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=f"invalid value for {key}"):
        load_config(None, overrides)


def test_valid_objective_keys_load() -> None:
    config = load_config(None, ["method=dinov2", "loss.centering=sinkhorn",
                                "loss.koleo_weight=0", "model.num_registers=4"])
    assert (config.method, config.loss.centering, config.loss.koleo_weight,
            config.model.num_registers) == ("dinov2", "sinkhorn", 0.0, 4)
    # 0 is allowed anywhere
    assert load_config(None, ["method=dino", "loss.koleo_weight=0"]).method == "dino"


def test_a_preset_s_dinov2_loss_keys_do_not_follow_another_method(tmp_path: Path) -> None:
    """A preset's KoLeo and iBOT weights and Sinkhorn-Knopp centering are DINOv2's:
    ``method=dino`` on top of it trains the paper's DINO (the keys back to the schema's
    defaults) and ``method=byol`` BYOL, instead of stopping; in one layer with DINO the weights
    are an error."""
    preset = tmp_path / "preset.yaml"
    preset.write_text("method: dinov2\nloss:\n  koleo_weight: 0.3\n  ibot_weight: 0.5\n"
                      "  centering: sinkhorn\n")
    config = load_config(str(preset))
    assert (config.loss.koleo_weight, config.loss.ibot_weight, config.loss.centering) == (
        0.3, 0.5, "sinkhorn")
    assert load_config(str(preset), ["method=dinov2"]).loss == config.loss  # the same method
    for method in ("dino", "byol"):
        other = load_config(str(preset), [f"method={method}"])
        assert (other.method, other.loss.koleo_weight, other.loss.ibot_weight,
                other.loss.centering) == (method, None, None, "mean")
    assert load_config("dinov2", ["method=dino"]).loss.koleo_weight is None  # the dinov2 preset
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text("method: dino\nloss:\n  koleo_weight: 0.3\n")
    with pytest.raises(ConfigError, match="invalid value for loss.koleo_weight"):
        load_config(str(mixed))
