"""Stopping on request: SIGTERM and SIGINT save the current step, then the run exits.

Clusters preempt jobs with a warning signal (Slurm sends SIGTERM, or the signal of ``--signal``,
before SIGKILL); a user stops a run with Ctrl-C (SIGINT). The handler only records the signal:
the loop finishes the step in progress, saves a checkpoint of that step and raises
``RunStopped``, which the command turns into exit status 4 (``EXIT_STOPPED`` in cli.py) and one
line on how to resume. A second SIGINT gets the default behaviour back (Ctrl-C twice stops at
once, from the last checkpoint). A second SIGTERM changes nothing: on a Slurm cluster each
process of a torchrun job gets Slurm's signal and torchrun's copy of it, milliseconds apart, and
SIGKILL is the hard stop that follows a SIGTERM there anyway.

The same object asks for a save when ``run.checkpoint_every_minutes`` of wall-clock time have
passed since the last one, which bounds what a crash or a SIGKILL can lose.

Several processes must stop and save at the same step: a process that stopped alone would leave
the others waiting in their next all-reduce. Each sees its signal and its clock at its own time,
so the two flags are agreed with one all-reduce (``any_process``). In one process that needs no
communication and is done after every step; under DDP it is done at log steps, where the loop
syncs anyway, so a stop there waits at most ``run.log_every_steps`` steps.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any

import torch

from dinolab.distributed import any_process, world_size

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunStopped(RuntimeError):
    """A stop signal arrived; the checkpoint of the current step is saved."""


@dataclass(frozen=True)
class Decision:
    stop: bool  # save, then raise RunStopped
    save: bool  # save a checkpoint of the current step


class StopControl:
    """Signal handlers (installed by ``with``, restored after) and the checkpoint timer."""

    def __init__(self, checkpoint_every_minutes: float, device: torch.device) -> None:
        self.every_seconds = checkpoint_every_minutes * 60
        self.device = device
        self.signal_name: str | None = None
        self.last_save = time.monotonic()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopControl:
        if threading.current_thread() is threading.main_thread():  # handlers live there only
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: FrameType | None) -> None:
        self.signal_name = self.signal_name or signal.Signals(number).name
        if number == signal.SIGINT:  # a second Ctrl-C: now
            signal.signal(number, self._previous.get(number, signal.SIG_DFL))

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def poll(self, sync_point: bool) -> Decision:
        """Whether to stop and whether to save now; every process gets the same answer.

        ``sync_point``: a log step (the only steps at which processes compare flags).
        """
        if world_size() > 1 and not sync_point:
            return Decision(stop=False, save=False)
        stop = self.signal_name is not None
        due = self.every_seconds > 0 and time.monotonic() - self.last_save >= self.every_seconds
        stop, due = any_process([stop, due], self.device)  # a collective under DDP
        return Decision(stop=stop, save=stop or due)

    def describe(self) -> str:
        return self.signal_name or "a stop signal on another process"
