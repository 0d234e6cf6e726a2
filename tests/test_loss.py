"""DINOLoss: agreement with lightly's independent implementation, a hand-computed case, and the
properties the paper relies on (no gradient to the teacher, ln K for a uniform output)."""

from __future__ import annotations

import math

import pytest
import torch
from lightly.loss import DINOLoss as LightlyDINOLoss

from dinolab.losses.dino import DINOLoss, batch_center


def _view_major(views: list[torch.Tensor]) -> torch.Tensor:
    """V tensors [B, K] -> [V * B, K]: rows [view 0 of the batch; view 1 of the batch; ...]."""
    return torch.cat(views, dim=0)


@pytest.mark.parametrize("num_local", [0, 1, 4])
@pytest.mark.parametrize("teacher_temp", [0.04, 0.07])
def test_matches_lightly_over_two_steps(num_local: int, teacher_temp: float) -> None:
    batch, out_dim, student_temp, momentum = 5, 33, 0.1, 0.9
    ours = DINOLoss(out_dim, student_temp=student_temp, center_momentum=momentum)
    # lightly's own warm-up schedule is bypassed: the temperature is passed to forward.
    reference = LightlyDINOLoss(out_dim, warmup_teacher_temp=0.5, teacher_temp=0.5,
                                warmup_teacher_temp_epochs=0, student_temp=student_temp,
                                center_momentum=momentum)
    generator = torch.Generator().manual_seed(1234 + num_local)
    for step in range(2):  # step 1 runs with the nonzero center left by step 0
        teacher_views = [3 * torch.randn(batch, out_dim, generator=generator) + 1.5
                         for _ in range(2)]
        student_views = [2 * torch.randn(batch, out_dim, generator=generator)
                         for _ in range(2 + num_local)]

        expected = reference(teacher_views, student_views, teacher_temp=teacher_temp)
        teacher_logits = _view_major(teacher_views)
        actual = ours(_view_major(student_views), teacher_logits, teacher_temp)
        ours.update_center(batch_center(teacher_logits))

        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=f"step {step}")
        torch.testing.assert_close(ours.center, reference.center.reshape(1, out_dim),
                                   rtol=1e-6, atol=1e-6, msg=f"center after step {step}")
    assert ours.center.abs().max() > 0.05  # the second step really used a nonzero center


def _cross_entropy(target: list[float], logits: list[float], temperature: float) -> float:
    """H(p, softmax(logits / temperature)) = -sum_k p_k log q_k, written out by hand."""
    exps = [math.exp(x / temperature) for x in logits]
    total = sum(exps)
    return -sum(p * math.log(e / total) for p, e in zip(target, exps, strict=True))


def _softmax(values: list[float], temperature: float) -> list[float]:
    exps = [math.exp(x / temperature) for x in values]
    return [e / sum(exps) for e in exps]


def test_hand_computed_two_global_one_local() -> None:
    student_temp, teacher_temp = 0.5, 0.25
    center = [0.2, -0.1, 0.0]
    teacher = [[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]  # global views 0 and 1, batch of 1
    student = [[0.3, -0.2, 0.1], [0.0, 1.0, 0.5], [-0.4, 0.2, 0.8]]  # globals, then one local
    loss = DINOLoss(3, student_temp=student_temp)
    loss.center.copy_(torch.tensor([center]))

    centred = [[t - c for t, c in zip(view, center, strict=True)] for view in teacher]
    targets = [_softmax(view, teacher_temp) for view in centred]
    pairs = [(i, v) for i in range(2) for v in range(3) if v != i]
    assert len(pairs) == 4
    expected = sum(_cross_entropy(targets[i], student[v], student_temp) for i, v in pairs) / 4

    actual = loss(torch.tensor(student), torch.tensor(teacher), teacher_temp)
    assert actual.item() == pytest.approx(expected, rel=1e-6)


def test_hand_computed_batch_mean_and_center_update() -> None:
    """Batch of 2, only global views: each pair is averaged over the batch; the center is an EMA
    of the mean raw teacher logit over both views and the batch."""
    student_temp, teacher_temp, momentum = 0.1, 0.04, 0.9
    teacher = torch.tensor([[0.1, 0.3], [0.2, -0.2],   # view 0: images 0, 1
                            [0.0, 0.1], [0.4, 0.0]])   # view 1: images 0, 1
    student = torch.tensor([[0.5, -0.5], [0.1, 0.2],
                            [-0.3, 0.3], [0.05, 0.0]])
    loss = DINOLoss(2, student_temp=student_temp, center_momentum=momentum)

    rows_t, rows_s = teacher.tolist(), student.tolist()
    # pairs (teacher 0, student 1) and (teacher 1, student 0), each averaged over 2 images
    pair_01 = sum(_cross_entropy(_softmax(rows_t[b], teacher_temp), rows_s[2 + b], student_temp)
                  for b in range(2)) / 2
    pair_10 = sum(_cross_entropy(_softmax(rows_t[2 + b], teacher_temp), rows_s[b], student_temp)
                  for b in range(2)) / 2
    assert loss(student, teacher, teacher_temp).item() == pytest.approx((pair_01 + pair_10) / 2,
                                                                        rel=1e-6)

    loss.update_center(batch_center(teacher))
    mean = [sum(row[k] for row in rows_t) / 4 for k in range(2)]
    expected_center = [(1 - momentum) * m for m in mean]  # from a zero center
    assert loss.center.tolist()[0] == pytest.approx(expected_center, abs=1e-7)
    loss.update_center(batch_center(teacher))
    expected_center = [momentum * c + (1 - momentum) * m
                       for c, m in zip(expected_center, mean, strict=True)]
    assert loss.center.tolist()[0] == pytest.approx(expected_center, abs=1e-7)


def test_forward_does_not_move_the_center() -> None:
    """The center is updated after the loss, by update_center only (step t uses the old one)."""
    loss = DINOLoss(8)
    loss(torch.randn(8, 8), torch.randn(4, 8) + 3, 0.04)
    assert torch.count_nonzero(loss.center) == 0


def test_no_gradient_flows_to_teacher_logits() -> None:
    loss = DINOLoss(16)
    student = torch.randn(4 * 3, 16, requires_grad=True)
    teacher = torch.randn(2 * 3, 16, requires_grad=True)
    loss(student, teacher, 0.04).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("out_dim", [2, 7, 4096])
def test_uniform_output_gives_ln_k(out_dim: int) -> None:
    batch, views = 3, 5
    loss = DINOLoss(out_dim)
    value = loss(torch.full((views * batch, out_dim), 0.7), torch.full((2 * batch, out_dim), -2.0),
                 0.04)
    assert value.item() == pytest.approx(math.log(out_dim), rel=2e-5)  # fp32 sum over K
