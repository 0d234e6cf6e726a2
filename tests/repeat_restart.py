"""The restart of issue 14, repeated: ``python tests/repeat_restart.py [RUNS] [OUT]``.

Each run: ``torchrun --standalone --nproc_per_node=2 --max-restarts=1 -m dinolab.cli train``
(the tests' tiny ViT, 3 epochs of 12 steps, batch 32, data.num_workers=0, CPU); one of the 2
training processes (rank 0 and rank 1 in turn) is SIGKILLed as soon as the first checkpoint
exists; torchrun restarts both, they resume, and the run must end with the student, teacher and
center of an uninterrupted run (torch.equal). A run that does not end within LIMIT_S counts as a
hang. Prints one line per run and a summary; not part of the suite (minutes per run on 2 cores).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_fashion_mnist, tiny_overrides  # noqa: E402
from equivalence import assert_same_networks  # noqa: E402
from test_slurm import _descendants, _kill_tree  # noqa: E402

from dinolab.training.checkpoint import LATEST, step_files  # noqa: E402

LIMIT_S = 600


def command(data_root: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "--max-restarts=1", "-m", "dinolab.cli", "train",
            *tiny_overrides(data_root, run_dir), "train.epochs=3", "train.batch_size=32",
            "train.device=cpu", "model.drop_path_rate=0.0", "model.head.norm=none"]


def rank_pid(agent: int, rank: int) -> int | None:
    for pid in _descendants(agent):
        try:
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
        except OSError:
            continue
    return None


def run(data_root: Path, run_dir: Path, kill_rank: int | None) -> dict[str, Any]:
    """One torchrun run -> its timings (s) and exit status; None for kill_rank: no kill."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    shutil.rmtree(run_dir, ignore_errors=True)
    log = open(run_dir.with_suffix(".log"), "w")
    started = time.monotonic()
    agent = subprocess.Popen(command(data_root, run_dir), env=env, stdout=log,
                             stderr=subprocess.STDOUT)
    log.close()
    times: dict[str, Any] = {}
    try:
        while agent.poll() is None and time.monotonic() - started < LIMIT_S:
            if kill_rank is not None and "killed" not in times and step_files(run_dir):
                pid = rank_pid(agent.pid, kill_rank)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    times["killed"] = time.monotonic() - started
            if "killed" in times and "resumed" not in times and \
                    "resuming" in run_dir.with_suffix(".log").read_text():
                times["resumed"] = time.monotonic() - started
            time.sleep(0.01)
        times["total"] = time.monotonic() - started
        times["hang"] = agent.poll() is None
    finally:
        if agent.poll() is None:  # a hang, or this script interrupted
            _kill_tree(agent.pid)
    times["status"] = agent.wait()
    return times


def main(runs: int, out: Path) -> int:
    data_root = make_fashion_mnist(out / "fashion", num_train=384)
    reference_dir = out / "uninterrupted"
    reference = run(data_root, reference_dir, None)
    assert reference["status"] == 0, f"the uninterrupted run failed: {reference}"
    expected = torch.load(reference_dir / LATEST, weights_only=True)
    print(f"uninterrupted: {reference['total']:.0f} s", flush=True)
    good = 0
    for index in range(runs):
        run_dir = out / f"restart{index}"
        times = run(data_root, run_dir, kill_rank=index % 2)
        try:
            assert times["status"] == 0 and "resumed" in times
            assert_same_networks(torch.load(run_dir / LATEST, weights_only=True), expected)
            verdict, good = "same student, teacher and center", good + 1
        except (AssertionError, FileNotFoundError) as error:
            verdict = f"FAILED {'(hang) ' if times['hang'] else ''}{error}"
        print(f"run {index + 1}: rank {index % 2} killed at {times.get('killed', 0):.0f} s, "
              f"resumed at {times.get('resumed', 0):.0f} s, ended at {times['total']:.0f} s, "
              f"exit {times['status']}: {verdict}", flush=True)
    print(f"{good}/{runs} restarts resumed and ended as the uninterrupted run", flush=True)
    return 0 if good == runs else 1


if __name__ == "__main__":
    arguments = sys.argv[1:]
    runs = int(arguments[0]) if arguments else 10
    out = Path(arguments[1]) if len(arguments) > 1 else Path("runs/repeat_restart")
    out.mkdir(parents=True, exist_ok=True)
    sys.exit(main(runs, out))
