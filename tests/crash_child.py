"""The child process of test_crash_safety.py: ``dinolab train`` with a crash arranged by a patch.

    python tests/crash_child.py PLAN [ARGUMENTS of dinolab train ...]

PLAN:
- ``plain``: nothing is patched.
- ``slow``: every optimizer step also sleeps 0.1 s, so the parent can kill it at a step it sees
  in metrics.jsonl.
- ``kill-in-write:N``: the N-th checkpoint serialisation writes half of its bytes to the
  temporary file, then the process SIGKILLs itself: a crash inside a checkpoint write.
- ``kill-before-latest:N``: SIGKILL once the N-th step file is complete, before checkpoint.pt
  points to it.
- ``raise:N``: the N-th optimizer step raises a RuntimeError: a bug, which no handler expects.

The patches live here, in the test's child, not in the product: dinolab has no test hooks.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arrange(plan: str) -> None:
    import torch

    from dinolab.training import checkpoint, loop

    name, _, count = plan.partition(":")
    calls = {"n": 0}
    if name == "slow":
        train_step = loop.train_step

        def slow_step(*arguments: Any) -> Any:
            time.sleep(0.1)
            return train_step(*arguments)

        loop.train_step = slow_step  # type: ignore[assignment]
    elif name == "kill-in-write":
        save = torch.save

        def half_written(state: Any, path: Any, *arguments: Any, **options: Any) -> None:
            calls["n"] += 1
            if calls["n"] < int(count):
                return save(state, path, *arguments, **options)
            buffer = io.BytesIO()
            save(state, buffer)
            with open(path, "wb") as handle:
                handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                handle.flush()
                os.fsync(handle.fileno())
            _kill_self()

        torch.save = half_written  # type: ignore[assignment]
    elif name == "kill-before-latest":
        link_or_copy = checkpoint._link_or_copy

        def then_die(source: Path, target: Path) -> None:
            if target.name == f".{checkpoint.LATEST}.tmp":
                calls["n"] += 1
                if calls["n"] >= int(count):
                    _kill_self()
            link_or_copy(source, target)

        checkpoint._link_or_copy = then_die  # type: ignore[assignment]
    elif name == "raise":
        train_step = loop.train_step

        def failing_step(*arguments: Any) -> Any:
            calls["n"] += 1
            if calls["n"] >= int(count):
                raise RuntimeError("a bug in the step")
            return train_step(*arguments)

        loop.train_step = failing_step  # type: ignore[assignment]
    elif name != "plain":
        raise SystemExit(f"unknown plan {plan}")


if __name__ == "__main__":
    _arrange(sys.argv[1])
    from dinolab.cli import main

    sys.exit(main(["train", *sys.argv[2:]]))
