"""Collapse warning: the signature of a collapsed DINO run, held over a window of logged steps.

DINO avoids collapse by balancing centering (pushes the teacher towards a uniform output) against
sharpening (pushes it towards one prototype) (Caron et al. 2021, Sec. 3.1 and Fig. 7). A
collapsed run shows it in the numbers the loop logs (DINO_SPEC.md, "Collapse signature"):

- uniform output: the teacher's entropy reaches ln K and the loss sits at ln K;
- one prototype wins: the teacher's entropy falls to 0;
- in both, the student copies the teacher: KL(teacher || student) = loss - entropy goes to 0.

A healthy run keeps KL well above 0 (about 1 nat in the demo, docs/LOG.md) with an entropy far
from both ends, and begins with KL of several nats, so requiring KL near 0 *and* an entropy at one
end *for a window of consecutive logged steps* does not fire on a healthy start. The warning is
printed once each time the signature sets in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KL_NEAR_ZERO = 0.05
"""nats: the student matches the teacher (a healthy run's KL stays near 1 nat)."""

ENTROPY_NEAR_ZERO = 0.05
"""nats: effectively one prototype (exp(0.05) = 1.05 prototypes in use); the healthy demo
teacher is at 0.4 nats, so the floor is absolute rather than a fraction of ln K."""

UNIFORM_FRACTION = 0.95
"""Entropy or loss at >= 95% of ln K: nearly every prototype equally likely."""

WINDOW = 10
"""Consecutive logged steps (100 optimizer steps at run.log_every_steps=10) the signature must
hold: one noisy log line is not a collapse, and a run that recovers is not reported."""

UNIFORM_LEVERS = ("the teacher is not sharp enough: a lower loss.teacher_temp (e.g. 0.04 or "
                  "0.02), a lower optim.lr, a higher optim.teacher_momentum")
ONE_PROTOTYPE_LEVERS = ("the centering is too weak for the sharpening: a lower "
                        "loss.center_momentum (a faster center), a higher loss.teacher_temp, a "
                        "lower optim.lr")


def signature(loss: float, entropy: float, log_k: float) -> str | None:
    """'uniform', 'one prototype', or None for one logged step (K prototypes, log_k = ln K)."""
    if loss - entropy > KL_NEAR_ZERO:
        return None
    if entropy >= UNIFORM_FRACTION * log_k or loss >= UNIFORM_FRACTION * log_k:
        return "uniform"
    if entropy <= ENTROPY_NEAR_ZERO:
        return "one prototype"
    return None


@dataclass
class CollapseDetector:
    """Feed every logged step; ``observe`` returns a warning line when one is due."""

    num_prototypes: int
    window: int = WINDOW
    held: int = 0
    kind: str | None = None
    warned: bool = False

    def observe(self, step: int, loss: float, entropy: float) -> str | None:
        log_k = math.log(self.num_prototypes)
        kind = signature(loss, entropy, log_k)
        if kind is None or kind != self.kind:
            self.held, self.warned, self.kind = 0, False, kind
        if kind is None:
            return None
        self.held += 1
        if self.held < self.window or self.warned:
            return None
        self.warned = True
        levers = UNIFORM_LEVERS if kind == "uniform" else ONE_PROTOTYPE_LEVERS
        return (f"warning: the run looks collapsed ({kind}) for the last {self.held} logged "
                f"steps, up to step {step}: loss {loss:.3f}, teacher entropy {entropy:.3f} "
                f"(ln K = {log_k:.2f}), KL(teacher || student) {loss - entropy:.3f}; {levers}")
