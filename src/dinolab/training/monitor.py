"""What a run tells its user: console lines, a tqdm bar, metrics.jsonl, TensorBoard and W&B.

Only the main process writes; every function here is a no-op elsewhere.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dinolab.distributed import is_main_process


def say(message: str) -> None:
    """Print one line from the main process only (tqdm-safe)."""
    if is_main_process():
        tqdm.write(message)


class Metrics:
    """metrics.jsonl (one JSON object per logged step or epoch), and the same numbers as
    scalars in TensorBoard and in a W&B run (``wandb_run``: training/wandb_logging.py)."""

    def __init__(self, run_dir: Path, tensorboard: bool, wandb_run: Any | None = None) -> None:
        self.enabled = is_main_process()
        self.path = run_dir / "metrics.jsonl"
        self.wandb_run = wandb_run
        self.writer = None
        if self.enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                pass
            else:
                self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        scalars = {f"{kind}/{key}": value for key, value in values.items()
                   if isinstance(value, (int, float)) and key != "epoch"}
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    @property
    def takes_images(self) -> bool:
        return self.writer is not None or self.wandb_run is not None

    def log_images(self, tag: str, step: int, images: np.ndarray) -> None:
        """uint8 pictures [N, H, W, 3] to TensorBoard and W&B (metrics.jsonl holds numbers)."""
        if self.writer is not None:
            self.writer.add_images(tag, images, step, dataformats="NHWC")
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({tag: [wandb.Image(image) for image in images]}, step=step)

    def close(self, failed: bool = False) -> None:
        """``failed``: the run ended with an error (W&B marks its run so)."""
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if failed else 0)


def last_knn(metrics_path: Path) -> float | None:
    """The last k-NN top-1 recorded in a run's metrics.jsonl, if any."""
    if not metrics_path.is_file():
        return None
    values = [json.loads(line).get("knn_top1") for line in metrics_path.read_text().splitlines()]
    recorded = [value for value in values if value is not None]
    return recorded[-1] if recorded else None


def progress_bar(total: int, initial: int, epoch: int, epochs: int, enabled: bool) -> tqdm:
    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                disable=not (enabled and is_main_process()), dynamic_ncols=True, leave=False)
