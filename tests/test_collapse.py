"""The collapse warning fires on sustained collapse signatures, and not on healthy or noisy runs.

Synthetic series of (loss, teacher entropy) per logged step, with K = 1024 (ln K = 6.93); the
healthy one is the demo's own trajectory (docs/LOG.md: entropy 2.3 -> 0.4, KL 3.9 -> 1.0).
"""

from __future__ import annotations

import math

import pytest

from dinolab.training.collapse import WINDOW, CollapseDetector, signature

K = 1024
LOG_K = math.log(K)


def warnings_for(series: list[tuple[float, float]]) -> list[tuple[int, str]]:
    detector = CollapseDetector(K)
    found = []
    for step, (loss, entropy) in enumerate(series, start=1):
        warning = detector.observe(step * 10, loss, entropy)
        if warning:
            found.append((step, warning))
    return found


UNIFORM = (LOG_K - 0.001, LOG_K - 0.01)  # loss at ln K, entropy at ln K, KL ~ 0
ONE_PROTOTYPE = (0.03, 0.01)  # entropy ~ 0, KL ~ 0
HEALTHY_START = [(6.27, 2.33), (5.14, 1.78), (3.88, 1.16), (2.74, 0.89), (2.17, 0.64)]
HEALTHY = HEALTHY_START + [(1.6 + 0.05 * (i % 3), 0.4 + 0.02 * (i % 5)) for i in range(40)]


@pytest.mark.parametrize(("point", "kind"), [
    (UNIFORM, "uniform"), (ONE_PROTOTYPE, "one prototype"), ((1.6, 0.4), None),
    ((LOG_K, LOG_K - 1.0), None),  # loss at ln K but the student still differs: KL = 1
    ((0.5, 0.3), None),  # KL 0.2: a sharp teacher the student still learns from
])
def test_signature_of_one_logged_step(point: tuple[float, float], kind: str | None) -> None:
    assert signature(*point, LOG_K) == kind


def test_healthy_demo_run_never_warns() -> None:
    assert warnings_for(HEALTHY) == []


@pytest.mark.parametrize(("point", "kind", "lever"), [
    (UNIFORM, "uniform", "loss.teacher_temp"),
    (ONE_PROTOTYPE, "one prototype", "loss.center_momentum"),
])
def test_sustained_collapse_warns_once_after_the_window(point: tuple[float, float], kind: str,
                                                         lever: str) -> None:
    found = warnings_for(HEALTHY_START + [point] * (3 * WINDOW))
    assert len(found) == 1, found
    step, warning = found[0]
    assert step == len(HEALTHY_START) + WINDOW  # exactly when the window is full
    assert warning.startswith(f"warning: the run looks collapsed ({kind})")
    assert lever in warning and "\n" not in warning


def test_a_short_or_interrupted_signature_does_not_warn() -> None:
    blip = [UNIFORM] * (WINDOW - 1) + [(1.6, 0.4)]
    assert warnings_for(HEALTHY_START + blip * 3) == []


def test_a_collapse_that_returns_after_recovery_warns_again() -> None:
    episode = [ONE_PROTOTYPE] * WINDOW + [(1.6, 0.4)] * 3
    assert len(warnings_for(episode * 2)) == 2
