"""method=byol (Grill et al., 2020): its MLPs and loss against lightly's, a training step, and a
run's checkpoint.

lightly (OBJECTIVES_SPEC.md section 2) is the independent implementation: ``BYOLProjectionHead``
and ``BYOLPredictionHead`` for the MLPs (our weights copied into theirs, same outputs in train
and eval mode), ``NegativeCosineSimilarity`` for the loss (its example's
0.5 * (ncs(p0, z1) + ncs(p1, z0)) with 2 views; a hand sum of its pairs with local views).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import global_torch_state_kept, make_fashion_mnist, tiny_overrides
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.modules.heads import ProjectionHead

import dinolab
from dinolab.config import Config, ConfigError, load_config
from dinolab.methods import OBJECTIVES, StepValues, batch_position
from dinolab.methods.byol import BYOL, BYOLNetwork, NegativeCosineLoss, byol_mlp, output_std
from dinolab.training import loop
from dinolab.training.checkpoint import LATEST
from dinolab.training.state import build_state
from dinolab.training.step import train_step

HIDDEN, OUT = 32, 16
BYOL_OVERRIDES = ("method=byol", f"model.byol.hidden_dim={HIDDEN}", f"model.byol.out_dim={OUT}")
BATCH = 8
TOLERANCE: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-6}


def byol_config(root: Path, *extra: str) -> Config:
    overrides = tiny_overrides(root / "no-data", root / "run")
    return load_config(None, [*overrides, "train.device=cpu", *BYOL_OVERRIDES, *extra])


def make_views(generator: torch.Generator, batch: int = BATCH) -> list[torch.Tensor]:
    """2 global views [B, 3, 28, 28] then 2 local views [B, 3, 14, 14] (the tiny config)."""
    return [torch.randn(batch, 3, size, size, generator=generator) for size in (28, 28, 14, 14)]


@pytest.mark.parametrize("reference", [BYOLProjectionHead, BYOLPredictionHead])
def test_mlp_matches_lightly_in_train_and_eval_mode(reference: type[ProjectionHead]) -> None:
    torch.manual_seed(0)
    ours = byol_mlp(24, HIDDEN, OUT)
    theirs = reference(24, HIDDEN, OUT)  # type: ignore[call-arg]
    theirs.layers.load_state_dict(ours.state_dict())  # strict: the same layers, one to one
    assert ours[0].bias is None and ours[3].bias is not None
    inputs = torch.randn(2, 10, 24, generator=torch.Generator().manual_seed(1))
    for batch in inputs:  # train mode: batch statistics, and the running ones updated alike
        torch.testing.assert_close(ours(batch), theirs(batch), **TOLERANCE)
    torch.testing.assert_close(ours[1].running_mean, theirs.layers[1].running_mean)
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours(inputs[0]), theirs(inputs[0]), **TOLERANCE)


def test_networks_normalise_each_view_alone(tmp_path: Path) -> None:
    """The online network's output is lightly's heads applied to each view's features."""
    objective = BYOL(byol_config(tmp_path))
    torch.manual_seed(0)
    student = objective.build_network(0.0, student=True)
    teacher = objective.build_network(0.0, student=False)
    assert isinstance(student, BYOLNetwork) and teacher.predictor is None  # type: ignore[union-attr]
    projector, predictor = BYOLProjectionHead(32, HIDDEN, OUT), BYOLPredictionHead(OUT, HIDDEN, OUT)
    projector.layers.load_state_dict(student.projector.state_dict())
    predictor.layers.load_state_dict(student.predictor.state_dict())  # type: ignore[union-attr]
    views = make_views(torch.Generator().manual_seed(2))
    expected = torch.cat([predictor(projector(student.backbone(view))) for view in views])
    torch.testing.assert_close(student(views), expected, **TOLERANCE)


def lightly_pairs(predictions: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """The hand computation: lightly's negative cosine summed over each (view, other global
    view) pair, divided by the number of pairs."""
    ncs = NegativeCosineSimilarity()
    pairs = [ncs(prediction, target) for v, prediction in enumerate(predictions)
             for t, target in enumerate(targets) if v != t]
    assert len(pairs) == 2 * len(predictions) - 2
    return torch.stack(pairs).mean()


def test_loss_matches_lightly_example_with_two_views() -> None:
    generator = torch.Generator().manual_seed(0)
    p0, p1, z0, z1 = (torch.randn(BATCH, OUT, generator=generator) for _ in range(4))
    p0.requires_grad_()
    ours = NegativeCosineLoss()(torch.cat([p0, p1]), torch.cat([z0, z1]))
    ncs = NegativeCosineSimilarity()
    theirs = 0.5 * (ncs(p0, z1) + ncs(p1, z0))
    torch.testing.assert_close(ours, theirs, **TOLERANCE)
    (our_gradient,) = torch.autograd.grad(ours, p0)
    (their_gradient,) = torch.autograd.grad(theirs, p0)
    torch.testing.assert_close(our_gradient, their_gradient, **TOLERANCE)


def test_loss_with_local_views_is_the_mean_over_view_pairs() -> None:
    generator = torch.Generator().manual_seed(0)
    predictions = [torch.randn(BATCH, OUT, generator=generator) for _ in range(5)]  # 2 + 3
    targets = [torch.randn(BATCH, OUT, generator=generator) for _ in range(2)]
    ours = NegativeCosineLoss()(torch.cat(predictions), torch.cat(targets))
    torch.testing.assert_close(ours, lightly_pairs(predictions, targets), **TOLERANCE)


def test_loss_is_fp32_under_autocast() -> None:
    generator = torch.Generator().manual_seed(0)
    predictions = torch.randn(4 * BATCH, OUT, generator=generator)
    targets = torch.randn(2 * BATCH, OUT, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = NegativeCosineLoss()(predictions.bfloat16(), targets.bfloat16())
    assert loss.dtype == torch.float32
    expected = lightly_pairs(list(predictions.bfloat16().float().chunk(4)),
                             list(targets.bfloat16().float().chunk(2)))
    torch.testing.assert_close(loss, expected, **TOLERANCE)


def test_output_std_is_zero_when_collapsed_and_near_one_over_root_k_when_spread() -> None:
    collapsed = torch.ones(2 * 64, 128)
    assert output_std(collapsed).item() == 0.0
    spread = torch.randn(2 * 4096, 128, generator=torch.Generator().manual_seed(0))
    assert output_std(spread).item() == pytest.approx(128**-0.5, rel=0.02)


def test_a_micro_batch_of_one_image_is_a_config_error(tmp_path: Path) -> None:
    objective = BYOL(byol_config(tmp_path))
    network = objective.build_network(0.0, student=True)
    objective.check(network, 2)
    with pytest.raises(ConfigError, match="train.batch_size"):
        objective.check(network, 1)


def test_train_step_moves_the_student_and_the_teacher_by_ema(tmp_path: Path) -> None:
    assert OBJECTIVES["byol"] is BYOL
    torch.manual_seed(0)
    state = build_state(byol_config(tmp_path, "model.drop_path_rate=0.0"))
    student, teacher = state.student_module, state.teacher
    student_names = set(dict(student.named_parameters()))
    teacher_names = set(dict(teacher.named_parameters()))
    assert teacher_names < student_names
    assert {name.split(".")[0] for name in student_names - teacher_names} == {"predictor"}
    before = {name: value.clone() for name, value in teacher.state_dict().items()}
    student_before = {name: value.clone() for name, value in student.named_parameters()}
    momentum = 0.9
    values = StepValues(lr=1e-3, weight_decay=0.04, teacher_momentum=momentum,
                        teacher_temp=0.04, freeze_last_layer=False)

    loss = train_step(state, [make_views(torch.Generator().manual_seed(1))], values)

    assert -1.0 <= loss.item() <= 1.0
    student_after = dict(student.named_parameters())
    for name in ("predictor.0.weight", "projector.3.bias", "backbone.blocks.0.mlp.fc1.weight"):
        assert not torch.equal(student_after[name], student_before[name]), name
    for name, parameter in teacher.named_parameters():  # the EMA, exactly (its two roundings)
        expected = before[name].mul(momentum).add_(student_after[name], alpha=1 - momentum)
        assert torch.equal(parameter, expected), name
    moved = dict(teacher.named_parameters())["projector.0.weight"]
    assert not torch.equal(moved, before["projector.0.weight"])
    assert "output_std" in state.objective.monitor(loss.item(), {})


def test_the_predictor_learning_rate_scale_multiplies_its_step_alone(tmp_path: Path) -> None:
    """model.byol.predictor_lr_scale=10: from the same weights and views, one AdamW step moves
    the predictor 10 times as far (AdamW's step and decay are both proportional to the
    learning rate) and every other parameter exactly as with 1."""
    values = StepValues(lr=1e-3, weight_decay=0.04, teacher_momentum=0.9, teacher_temp=0.04,
                        freeze_last_layer=False)
    moved = {}
    for scale in (1, 10):
        torch.manual_seed(0)
        state = build_state(byol_config(tmp_path, "model.drop_path_rate=0.0",
                                        f"model.byol.predictor_lr_scale={scale}"))
        before = {name: value.clone() for name, value in state.student_module.named_parameters()}
        train_step(state, [make_views(torch.Generator().manual_seed(1))], values)
        moved[scale] = {name: value - before[name]
                        for name, value in state.student_module.named_parameters()}
        scaled = [group for group in state.optimizer.param_groups if "lr_scale" in group]
        assert len(scaled) == (0 if scale == 1 else 2)  # the predictor's decay, no decay
    for name, step in moved[1].items():
        if name.startswith("predictor."):
            torch.testing.assert_close(moved[10][name], 10 * step, rtol=1e-4, atol=1e-9)
            assert step.abs().max() > 0, name
        else:
            assert torch.equal(moved[10][name], step), name


def test_a_predictor_learning_rate_scale_of_zero_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.byol.predictor_lr_scale"):
        byol_config(tmp_path, "model.byol.predictor_lr_scale=0")


def test_forward_without_local_views(tmp_path: Path) -> None:
    objective = BYOL(byol_config(tmp_path, "data.num_local_crops=0"))
    torch.manual_seed(0)
    student = objective.build_network(0.0, student=True)
    teacher = objective.build_network(0.0, student=False)
    views = make_views(torch.Generator().manual_seed(1))[:2]
    position = batch_position(0, BATCH, BATCH, 0, 0, 1)
    values = StepValues(1e-3, 0.04, 0.9, 0.04, freeze_last_layer=False)
    output = objective.forward(student, teacher, views, position, values)
    with torch.no_grad():
        targets = teacher(views).chunk(2)
    expected = lightly_pairs(list(student(views).chunk(2)), list(targets))
    torch.testing.assert_close(output.loss, expected, **TOLERANCE)
    assert output.terms == {} and output.statistics == {}


@pytest.fixture(scope="module")
def byol_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny method=byol run of 1 epoch of 2 steps -> its run folder."""
    root = tmp_path_factory.mktemp("byol")
    overrides = tiny_overrides(make_fashion_mnist(root / "fashion"), root / "run")
    with global_torch_state_kept():
        loop.train(load_config(None, [*overrides, *BYOL_OVERRIDES, "train.epochs=1",
                                      "train.limit_steps_per_epoch=2"]))
    return root / "run"


def test_a_byol_run_resumed_with_another_method_is_a_config_error(byol_run: Path) -> None:
    saved = torch.load(byol_run / LATEST, weights_only=True)
    assert saved["method"] == "byol" and saved["loss"] == {}
    dino = load_config(str(byol_run / "config.yaml"), ["method=dino"])
    with pytest.raises(ConfigError, match="method"):  # the run folder's config.yaml
        loop.train(dino)
    with pytest.raises(ConfigError, match="method=byol"):  # the checkpoint itself
        build_state(dino).load_state_dict(saved)


def test_the_teacher_backbone_of_a_byol_run_loads(byol_run: Path) -> None:
    backbone, info = dinolab.load_backbone(byol_run)
    saved = torch.load(byol_run / LATEST, weights_only=True)["teacher"]
    for name, value in backbone.state_dict().items():
        assert torch.equal(value, saved[f"backbone.{name}"]), name
    assert info.weights == "teacher"
    assert backbone(torch.randn(2, 3, 28, 28)).shape == (2, 32)
