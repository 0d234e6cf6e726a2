"""``dinolab compare RUN [RUN ...]``: the ablation view of several run folders.

An ablation changes a few keys and asks what they did. The table prints one row per run with
only the configuration keys whose values differ between the runs (dotted names, in the order of
config.yaml), then where each run ended: its last logged train loss, the last k-NN top-1 of the
training monitor (k = ``eval.knn_k`` on the monitor's splits), the epochs done and the steps.
Left out are the keys that say where a run writes and reports or how fast it runs, and leave
what it learns alone (``IGNORED_SECTIONS``, ``IGNORED_KEYS``); ``data.root`` and the other
``eval.*`` keys stay, since they change the data or what the k-NN figure means.

Then the full-split figures that ``dinolab knn`` (k = 20) and ``dinolab linear`` keep in the run
folder's evaluation.json, where they have been computed.

The figure overlays the runs' curves, one panel each for the train loss, the k-NN top-1 and the
teacher's entropy (the collapse signal of DINO; the objectives that have no teacher entropy, such
as BYOL, leave that panel empty and its title says so). Everything is read from config.yaml and
metrics.jsonl as they are, so runs still training are compared as far as they got; a last line
cut mid-write is skipped (``plots.read_metrics``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dinolab.config import ConfigError
from dinolab.evaluation.results import read_results
from dinolab.visualization.plots import read_metrics, series

DEFAULT_OUTPUT = "compare.png"
CONFIG_FILE = "config.yaml"
# Where a run writes and how it reports, how fast it runs and on what: not what it learns.
IGNORED_SECTIONS = ("run",)
IGNORED_KEYS = frozenset({
    "data.num_workers", "data.download", "data.max_bad_fraction", "data.prefetch_views",
    "data.decode", "eval.batch_size", "eval.knn_every_epochs", "train.device", "train.compile",
    "train.parallel", "model.grad_checkpointing",
})
LOSS, KNN = (("train",), "loss"), (("knn", "epoch"), "knn_top1")
ENTROPY = (("train",), "teacher_entropy")
# (title, (kinds, key)) of each panel; per-epoch values are drawn with markers.
PANELS = (("train loss", LOSS), ("k-NN top-1 (%, monitor)", KNN),
          ("teacher entropy (nats)", ENTROPY))


@dataclass(frozen=True)
class Run:
    """One run folder as compare reads it: dotted configuration keys and metrics records."""

    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    results: dict[str, float]  # evaluation.json: the full-split k-NN and linear figures


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}, in the file's order; lists stay whole."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_run(path: Path) -> Run:
    """The run in ``path``; a folder that is missing or not a dinolab run is a ConfigError."""
    if not path.is_dir():
        raise ConfigError(f"{path}: no such folder")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise ConfigError(f"{path}: no {CONFIG_FILE} here (is it a dinolab run folder?)")
    try:
        values = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError:
        values = None
    if not isinstance(values, dict) or not isinstance(values.get("model"), dict):
        raise ConfigError(f"{config_path}: not a dinolab configuration")
    return Run(path, flatten(values), read_metrics(path), read_results(path))


def differing_keys(runs: Sequence[Run]) -> list[str]:
    """The keys whose values are not the same in every run (absent counts as a value)."""
    keys = list(dict.fromkeys(key for run in runs for key in run.config))
    return [key for key in keys
            if key.split(".")[0] not in IGNORED_SECTIONS and key not in IGNORED_KEYS
            and len({repr(run.config.get(key, ...)) for run in runs}) > 1]


def run_names(runs: Sequence[Run]) -> list[str]:
    """Each run's folder name, or the paths as given when two folders share a name."""
    names = [run.path.name or str(run.path) for run in runs]
    return names if len(set(names)) == len(names) else [str(run.path) for run in runs]


def _text(value: Any) -> str:
    """A configuration value as YAML writes it (true, null, 0.001); blank when absent."""
    if value is ...:
        return ""
    if isinstance(value, bool) or value is None or value == "":
        return {True: "true", False: "false", None: "null", "": "''"}[value]
    return f"{value:g}" if isinstance(value, float) else str(value)


def last_value(records: list[dict[str, Any]], kinds: tuple[str, ...], key: str) -> float | None:
    values = series(records, kinds, key)[1]
    return values[-1] if values else None


def summary_row(run: Run) -> list[str]:
    """loss, k-NN top-1, epochs done / planned, steps: where the run ended (or is now); then
    the full-split k-NN (k = 20) and linear top-1 where ``dinolab knn|linear`` computed them."""
    loss, knn = last_value(run.records, *LOSS), last_value(run.records, *KNN)
    full_knn, linear = run.results.get("knn_top1_k20"), run.results.get("linear_top1")
    epochs = [int(record["epoch"]) for record in run.records if record.get("kind") == "epoch"]
    planned = run.config.get("train.epochs")
    return [
        "" if loss is None else f"{loss:.4f}",
        "" if knn is None else f"{knn:.1f}",
        f"{epochs[-1] if epochs else 0}/{planned}" if planned is not None else "",
        str(max(int(record.get("step", 0)) for record in run.records)),
        "" if full_knn is None else f"{full_knn:.1f}",
        "" if linear is None else f"{linear:.1f}",
    ]


def table(runs: Sequence[Run]) -> str:
    """Plain aligned columns: names and configuration values left, figures right."""
    keys = differing_keys(runs)
    header = ["run", *keys, "loss", "k-NN top-1", "epochs", "steps", "full k-NN", "linear"]
    rows = [[name, *(_text(run.config.get(key, ...)) for key in keys), *summary_row(run)]
            for name, run in zip(run_names(runs), runs, strict=True)]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    left = 1 + len(keys)
    lines = ["  ".join(cell.ljust(width) if column < left else cell.rjust(width)
                       for column, (cell, width) in enumerate(zip(row, widths, strict=True)))
             for row in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines)


def draw(runs: Sequence[Run], out: Path) -> Path:
    """The runs' curves overlaid, one panel per PANELS entry, each run one colour -> ``out``."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("dinolab compare needs matplotlib: pip install dinolab[viz]") from None
    figure = Figure(figsize=(16, 4.8), layout="constrained")
    names = run_names(runs)
    for axes, (title, (kinds, key)) in zip(figure.subplots(1, len(PANELS)), PANELS, strict=True):
        for index, (name, run) in enumerate(zip(names, runs, strict=True)):
            steps, values = series(run.records, kinds, key)
            if steps:
                axes.plot(steps, values, "-" if kinds == ("train",) else "o-", markersize=4,
                          color=f"C{index}", label=name)
        if key == ENTROPY[1]:  # the entropy of a uniform output: one of the two collapses
            _draw_uniform_entropy(axes, runs)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.set_title(title)
            axes.legend(fontsize=8)
        else:
            axes.set_title(f"{title}: recorded by no run")
    figure.suptitle(f"{len(runs)} run(s): {', '.join(names)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    return out


def _draw_uniform_entropy(axes: Any, runs: Sequence[Run]) -> None:
    """ln K for each K of the runs that recorded an entropy (only when some did)."""
    dimensions = {run.config.get("model.head.out_dim") for run in runs
                  if series(run.records, *ENTROPY)[0]}
    for dimension in sorted(d for d in dimensions if isinstance(d, int)):
        axes.axhline(math.log(dimension), color="gray", linestyle="--", linewidth=1,
                     label=f"ln K (K = {dimension})")


def run_compare(paths: Sequence[str], out: str | None = None) -> Path:
    """The ``dinolab compare`` command: read every run first (one bad folder stops it with one
    line, before anything is printed or written), draw the figure, print the table."""
    runs = [read_run(Path(path)) for path in paths]
    written = draw(runs, Path(out) if out else Path(DEFAULT_OUTPUT))
    print(table(runs))
    print(f"curves of {len(runs)} run(s): {written}")
    return written
