"""The auto keys (dinolab/auto.py): the table's rows, its boundaries, a user's value winning,
the demo and the reference resolving to their recipes, and a resumed run keeping its values."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from conftest import global_torch_state_kept, make_fashion_mnist, tiny_overrides
from omegaconf import OmegaConf

from dinolab import auto
from dinolab.config import ConfigError, load_config
from dinolab.training import loop

IMAGENET = 1_281_167


def values(num_images: int, batch: int | str = auto.AUTO, epochs: int | str = auto.AUTO
           ) -> dict[str, Any]:
    return auto.auto_values(num_images, batch, epochs)


@pytest.mark.parametrize(("num_images", "batch", "epochs", "row"), [
    (500, 32, 40, 0), (2_000, 32, 10, 0), (10_000, 32, 3, 0), (25_600, 64, 3, 0),
    (60_000, 128, 3, 0), (100_000, 128, 2, 0), (999_999, 1024, 1, 0), (1_000_000, 1024, 100, 1),
    (IMAGENET, 1024, 100, 1),
])
def test_rows_by_number_of_images(num_images: int, batch: int, epochs: int, row: int) -> None:
    expected = auto.ROWS[row]
    assert auto.row_for(num_images) == expected
    resolved = values(num_images)
    assert (resolved["train.batch_size"], resolved["train.epochs"]) == (batch, epochs)
    assert resolved["model.head.out_dim"] == expected.out_dim
    assert resolved["loss.teacher_temp"] == resolved["loss.warmup_teacher_temp"]
    assert resolved["loss.teacher_temp"] == expected.teacher_temp
    assert resolved["loss.warmup_teacher_temp_epochs"] == 0
    steps = num_images // batch * epochs
    warmup_steps = resolved["optim.warmup_epochs"] * (num_images // batch)
    assert warmup_steps == pytest.approx(min(expected.warmup_fraction * steps,
                                             10 * (num_images // batch)))


@pytest.mark.parametrize(("processes", "accumulation", "batch"), [
    (1, 1, 32), (2, 1, 32), (3, 1, 33), (2, 4, 32), (64, 1, 64), (5, 3, 45),
])
def test_an_auto_batch_splits_over_processes_and_accumulation_steps(
        processes: int, accumulation: int, batch: int) -> None:
    assert auto.auto_batch(2_000, processes, accumulation) == batch


def test_demo_size_resolves_to_the_demo_recipe() -> None:
    """Fashion-MNIST's 60,000 images at batch 128, with the demo's 2 global crops alone: 5
    epochs, about the compute of 3 with 6 local crops."""
    config, chosen = auto.resolve(load_config(None), 60_000)
    assert set(chosen) == set(auto.AUTO_KEYS)
    assert auto.views_per_image(config.data) == 2
    assert (config.train.batch_size, config.train.epochs) == (128, 5)
    assert config.model.head.out_dim == 1024
    assert (config.loss.teacher_temp, config.loss.warmup_teacher_temp) == (0.02, 0.02)
    assert config.optim.teacher_momentum == pytest.approx(1 - 10 / 2340)  # 5 epochs of 468
    assert config.optim.warmup_epochs == pytest.approx(0.375)  # 175 of its 2,340 steps
    assert config.optim.freeze_last_layer_epochs == 0


@pytest.mark.parametrize(("local_crops", "views"), [(0, 2.0), (6, 3.5), (8, 4.0)])
def test_views_cost_their_area(local_crops: int, views: float) -> None:
    config = load_config(None, [f"data.num_local_crops={local_crops}", "data.global_crop_size=28",
                                "data.local_crop_size=14"])
    assert auto.views_per_image(config.data) == views


@pytest.mark.parametrize(("num_images", "views", "epochs"), [
    (2_000, 3.5, 10), (2_000, 2.0, 18), (2_000, 7.0, 5), (10_000, 2.0, 5), (60_000, 3.5, 3),
    (60_000, 2.0, 5), (60_000, 10.0, 1), (IMAGENET, 2.0, 100),
])
def test_cheaper_views_buy_more_epochs(num_images: int, views: float, epochs: int) -> None:
    """The images-seen rule holds the compute of REFERENCE_VIEWS views an image; the reference
    row keeps the paper's 100 epochs whatever the crops."""
    assert auto.auto_epochs(num_images, views) == epochs
    resolved = auto.auto_values(num_images, views=views)
    assert resolved["train.epochs"] == epochs


def test_reference_size_resolves_to_the_paper() -> None:
    config, _ = auto.resolve(load_config("imagenet_vit_small"), IMAGENET)
    assert (config.train.batch_size, config.train.epochs) == (1024, 100)
    assert config.model.head.out_dim == 65536
    assert (config.loss.teacher_temp, config.loss.warmup_teacher_temp) == (0.04, 0.04)
    assert config.optim.teacher_momentum == 0.996
    assert (config.optim.warmup_epochs, config.optim.freeze_last_layer_epochs) == (10, 1)


def test_warmups_count_steps_in_short_runs_and_epochs_in_long_ones() -> None:
    short = values(2_000, epochs=20)  # 62 steps an epoch
    assert short["optim.warmup_epochs"] == pytest.approx(1.5)  # 7.5% of 1,240 steps
    assert short["optim.freeze_last_layer_epochs"] == 0
    long = values(IMAGENET, epochs=300)
    assert long["optim.warmup_epochs"] == 10  # capped at the reference's 10 epochs
    assert long["optim.freeze_last_layer_epochs"] == 1


@pytest.mark.parametrize(("steps", "momentum"), [
    (10, 0.99), (1_000, 0.99), (2_000, 0.995), (2_500, 0.996), (125_000, 0.996),
])
def test_teacher_momentum_follows_the_run_length(steps: int, momentum: float) -> None:
    assert values(steps * 100, batch=100, epochs=1)["optim.teacher_momentum"] == pytest.approx(
        momentum)


def test_a_users_value_wins() -> None:
    config = load_config(None, ["model.head.out_dim=4096", "optim.teacher_momentum=0.9",
                                "train.epochs=3", "train.batch_size=256"])
    resolved, chosen = auto.resolve(config, 60_000)
    assert not {"model.head.out_dim", "train.epochs", "train.batch_size"} & set(chosen)
    assert (resolved.model.head.out_dim, resolved.optim.teacher_momentum) == (4096, 0.9)
    assert (resolved.train.epochs, resolved.train.batch_size) == (3, 256)
    assert resolved.optim.warmup_epochs == pytest.approx(0.075 * 3)  # follows the user's length
    assert config.model.head.out_dim == 4096 and config.loss.teacher_temp == auto.AUTO  # a copy
    kept, _ = auto.resolve(config, 60_000, kept={"loss.teacher_temp": 0.07})
    assert kept.loss.teacher_temp == 0.07


@pytest.mark.parametrize("override", ["train.epochs=1.5", "model.head.out_dim=big",
                                      "optim.warmup_epochs=true", "loss.teacher_temp=auto2"])
def test_anything_but_a_number_or_auto_is_a_config_error(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_a_resumed_run_keeps_its_values_when_the_data_grows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Runs see 192 images: 2 epochs of 96 images, 1 epoch of 160; K = 64 for speed.
    monkeypatch.setattr(auto, "IMAGES_SEEN", (192, 192))
    monkeypatch.setattr(auto, "REFERENCE_VIEWS", 2.5)  # the tiny runs' 2 global + 2 local crops
    monkeypatch.setattr(auto, "ROWS", (dataclasses.replace(auto.ROWS[0], out_dim=64),
                                       *auto.ROWS[1:]))
    data = make_fashion_mnist(tmp_path / "fashion", num_train=96)
    overrides = [item for item in tiny_overrides(data, tmp_path / "run")
                 if item.split("=")[0] not in auto.AUTO_KEYS]
    config = load_config(None, overrides)
    assert auto.unresolved(config) == list(auto.AUTO_KEYS)
    run_epoch = loop.run_epoch

    class Stop(Exception):
        pass

    def stop_at_second_epoch(state: Any, *args: Any) -> Any:
        if state.epoch == 1:
            raise Stop
        return run_epoch(state, *args)

    monkeypatch.setattr(loop, "run_epoch", stop_at_second_epoch)
    with global_torch_state_kept(), pytest.raises(Stop):
        loop.train(config)
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    first = {key: OmegaConf.select(saved, key) for key in auto.AUTO_KEYS}
    assert first["train.epochs"] == 2 and first["model.head.out_dim"] == 64
    assert first["train.batch_size"] == 32
    assert "auto values (for 96 images): train.batch_size=32, train.epochs=2" in (
        capsys.readouterr().out)

    make_fashion_mnist(tmp_path / "fashion", num_train=160)  # the data set grew
    assert auto.resolve(config, 160)[0].train.epochs == 1  # a new run would get 1 epoch
    monkeypatch.setattr(loop, "run_epoch", run_epoch)
    with global_torch_state_kept():
        result = loop.train(config)
    assert result.epochs_done == 2  # the resumed run kept its 2 epochs
    assert "auto values (as the run folder saved them)" in capsys.readouterr().out
    resumed = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert {key: OmegaConf.select(resumed, key) for key in auto.AUTO_KEYS} == first
