"""Training curves of a run as one PNG: loss, learning rate, collapse signals, k-NN accuracy.

Everything comes from the run's ``metrics.jsonl`` (see ``training/monitor.py``): "train"
records every ``run.log_every_steps`` steps, "epoch" records with the epoch's mean loss and
k-NN, and one "knn" record for the teacher at initialisation. The teacher's entropy and
KL(teacher || student) are the collapse signals of DINO_SPEC.md: entropy near ln K or near 0
with the KL near 0 means collapse.

matplotlib is an optional extra (``viz``): it is imported here only when a plot is drawn, and
only its object API is used (no pyplot), so no global backend is switched for the caller.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dinolab.config import ConfigError

METRICS_FILE = "metrics.jsonl"
DEFAULT_OUTPUT = "curves.png"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of RUN_DIR/metrics.jsonl; a line still being written (not JSON) is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no {METRICS_FILE} here (is it a dinolab run folder?)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if not records:
        raise ConfigError(f"{path}: no records yet")
    return records


def output_dim(run_dir: Path) -> int | None:
    """K, the number of prototypes, from the run's config.yaml (None when it cannot be read)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    value = OmegaConf.select(OmegaConf.load(path), "model.head.out_dim")
    return int(value) if isinstance(value, int) else None


def series(records: list[dict[str, Any]], kinds: tuple[str, ...], key: str,
           ) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` in the records of the given kinds, in file order."""
    chosen = [r for r in records if r.get("kind") in kinds and r.get(key) is not None]
    return [int(r["step"]) for r in chosen], [float(r[key]) for r in chosen]


def _draw(axes: Any, records: list[dict[str, Any]], panel: list[tuple[str, tuple[str, ...], str]],
          title: str) -> None:
    """One panel: a line (or markers, for per-epoch values) per (label, kinds, key)."""
    for label, kinds, key in panel:
        steps, values = series(records, kinds, key)
        if steps:
            style = "-" if kinds == ("train",) else "o-"
            axes.plot(steps, values, style, label=label, markersize=4)
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend(fontsize=8)
    else:
        axes.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=axes.transAxes)


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """The ``dinolab plot`` command: a 2x2 figure of the run's curves -> the PNG written."""
    records = read_metrics(run_dir)
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("dinolab plot needs matplotlib: pip install dinolab[viz]") from None
    figure = Figure(figsize=(11, 7), layout="constrained")
    loss, learning_rate, collapse, knn = figure.subplots(2, 2).flat
    _draw(loss, records, [("train", ("train",), "loss"), ("epoch mean", ("epoch",), "loss")],
          "DINO loss")
    _draw(learning_rate, records, [("learning rate", ("train",), "lr")], "learning rate")
    _draw(collapse, records, [("teacher entropy", ("train",), "teacher_entropy"),
                              ("KL(teacher || student)", ("train",), "kl_teacher_student")],
          "collapse signals (nats)")
    dimension = output_dim(run_dir)
    if dimension is not None:  # the entropy of a uniform output: one of the two collapses
        collapse.axhline(math.log(dimension), color="gray", linestyle="--", linewidth=1,
                         label=f"ln K (K = {dimension})")
        collapse.legend(fontsize=8)
    _draw(knn, records, [("k-NN top-1", ("knn", "epoch"), "knn_top1")], "k-NN top-1 (%)")
    figure.suptitle(str(run_dir))
    path = Path(out) if out is not None else Path(run_dir) / DEFAULT_OUTPUT
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
