"""Schedules: pure functions of the step with DINO's shapes (DINO_SPEC.md, Optimisation)."""

from __future__ import annotations

import math

import pytest

from dinolab import auto
from dinolab.config import Config, load_config
from dinolab.training.schedules import (
    RunLength,
    cosine,
    last_layer_frozen,
    learning_rate,
    teacher_momentum,
    teacher_temperature,
    warmup_cosine,
    weight_decay,
)


def _non_decreasing(values: list[float]) -> bool:
    return all(b >= a - 1e-12 for a, b in zip(values, values[1:], strict=False))


def _non_increasing(values: list[float]) -> bool:
    return all(b <= a + 1e-12 for a, b in zip(values, values[1:], strict=False))


def test_cosine_endpoints_midpoint_and_shape() -> None:
    total = 11
    values = [cosine(step, total, 2.0, 0.5) for step in range(total)]
    assert values[0] == pytest.approx(2.0)
    assert values[-1] == pytest.approx(0.5)
    assert values[5] == pytest.approx((2.0 + 0.5) / 2)  # half-way in progress
    assert _non_increasing(values)
    # the explicit formula, at a step that is neither end nor middle
    assert values[2] == pytest.approx(0.5 + 0.75 * (1 + math.cos(math.pi * 0.2)))
    increasing = [cosine(step, total, 0.04, 0.4) for step in range(total)]
    assert _non_decreasing(increasing) and increasing[-1] == pytest.approx(0.4)
    assert cosine(total + 5, total, 2.0, 0.5) == pytest.approx(0.5)  # clamped past the end


def test_warmup_cosine() -> None:
    total, warmup, peak, end = 50, 10, 3.0, 0.1
    values = [warmup_cosine(step, total, warmup, peak, end) for step in range(total)]
    assert values[0] == 0.0
    assert values[5] == pytest.approx(peak * 5 / warmup)  # linear
    assert values[warmup] == pytest.approx(peak)  # the end of warm-up is the peak
    assert values[-1] == pytest.approx(end)
    assert _non_decreasing(values[: warmup + 1])
    assert _non_increasing(values[warmup:])
    assert max(values) == pytest.approx(peak)
    # no warm-up: start at the peak
    assert warmup_cosine(0, total, 0, peak, end) == pytest.approx(peak)


def reference_config() -> Config:
    """The schema's defaults with auto resolved for ImageNet-1k: the paper's recipe."""
    return auto.resolve(Config(), 1_281_167)[0]


def _config(*overrides: str) -> Config:
    return load_config(None, list(overrides))


def test_learning_rate_follows_the_linear_scaling_rule() -> None:
    config = _config("optim.lr=0.002", "optim.min_lr=1e-5", "train.batch_size=512",
                     "optim.warmup_epochs=2", "train.epochs=6")
    length = RunLength(steps_per_epoch=7, epochs=6)
    values = [learning_rate(config, length, step) for step in range(length.total_steps)]
    warmup_steps = 2 * 7
    peak = 0.002 * 512 / 256
    assert values[0] == 0.0
    assert values[warmup_steps] == pytest.approx(peak)
    assert max(values) == pytest.approx(peak)
    assert values[-1] == pytest.approx(1e-5)
    assert _non_decreasing(values[: warmup_steps + 1])
    assert _non_increasing(values[warmup_steps:])
    assert all(a < b for a, b in zip(values[:warmup_steps], values[1 : warmup_steps + 1],
                                     strict=True))


def test_learning_rate_with_fractional_warmup_and_defaults() -> None:
    # the reference recipe: 5e-4 per 256, batch 1024, 10 warm-up epochs, 100 epochs
    config = reference_config()
    length = RunLength(steps_per_epoch=20, epochs=config.train.epochs)
    assert learning_rate(config, length, 0) == 0.0
    assert learning_rate(config, length, 10 * 20) == pytest.approx(5e-4 * 1024 / 256)
    assert learning_rate(config, length, length.total_steps - 1) == pytest.approx(1e-6)
    half = _config("optim.warmup_epochs=0.5", "train.epochs=3", "train.batch_size=1024")
    short = RunLength(steps_per_epoch=10, epochs=3)
    half_peak = half.optim.lr * half.train.batch_size / 256
    assert learning_rate(half, short, 4) == pytest.approx(half_peak * 4 / 5)  # 5 warm-up steps
    assert learning_rate(half, short, 5) == pytest.approx(half_peak)


def test_weight_decay_cosine_up() -> None:
    config = reference_config()
    length = RunLength(steps_per_epoch=13, epochs=4)
    values = [weight_decay(config, length, step) for step in range(length.total_steps)]
    assert values[0] == pytest.approx(0.04)
    assert values[-1] == pytest.approx(0.4)
    assert _non_decreasing(values)
    assert values[len(values) // 2] == pytest.approx(0.22, abs=0.02)


def test_teacher_momentum_cosine_to_one() -> None:
    config = reference_config()
    length = RunLength(steps_per_epoch=9, epochs=5)
    values = [teacher_momentum(config, length, step) for step in range(length.total_steps)]
    assert values[0] == pytest.approx(0.996)
    assert values[-1] == pytest.approx(1.0)
    assert _non_decreasing(values)
    assert all(0.996 - 1e-12 <= v <= 1.0 + 1e-12 for v in values)
    custom = _config("optim.teacher_momentum=0.9995")
    assert teacher_momentum(custom, length, 0) == pytest.approx(0.9995)


def test_teacher_temperature_warmup_per_epoch() -> None:
    config = _config("loss.warmup_teacher_temp=0.04", "loss.teacher_temp=0.07",
                     "loss.warmup_teacher_temp_epochs=30", "train.epochs=100")
    values = [teacher_temperature(config, epoch) for epoch in range(100)]
    assert values[0] == pytest.approx(0.04)
    assert values[29] == pytest.approx(0.07)  # the last warm-up epoch reaches teacher_temp
    assert values[15] == pytest.approx(0.04 + 0.03 * 15 / 29)  # linear in between
    assert all(v == pytest.approx(0.07) for v in values[29:])
    assert all(a < b for a, b in zip(values[:29], values[1:30], strict=True))


def test_teacher_temperature_without_warmup_is_constant() -> None:
    config = reference_config()  # reference default: 0.04 constant
    assert {teacher_temperature(config, epoch) for epoch in range(5)} == {0.04}
    config = _config("loss.teacher_temp=0.06", "loss.warmup_teacher_temp=0.03",
                     "loss.warmup_teacher_temp_epochs=0")
    assert teacher_temperature(config, 0) == pytest.approx(0.06)


def test_last_layer_frozen_for_the_first_epoch() -> None:
    config = reference_config()
    length = RunLength(steps_per_epoch=8, epochs=3)
    frozen = [last_layer_frozen(config, length, step) for step in range(length.total_steps)]
    assert frozen == [True] * 8 + [False] * 16
    none = _config("optim.freeze_last_layer_epochs=0")
    assert not any(last_layer_frozen(none, length, step) for step in range(length.total_steps))
    half = _config("optim.freeze_last_layer_epochs=0.5")
    assert [last_layer_frozen(half, length, step) for step in range(6)] == [True] * 4 + [False] * 2

