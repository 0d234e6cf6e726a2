"""What each objective learns on Fashion-MNIST, against raw pixels and random weights.

Trains the demo recipe once per objective (``dinolab train method=M``, the same preset, data and
length) and prints one table: the weighted k-NN top-1 (k = 20, T = 0.07) on the full splits
(60,000 train against 10,000 test images), the linear probe's test top-1, the mean images/s of
training and its minutes, beside two baselines evaluated the same way: the raw pixels
(mean-centred, L2-normalised) and the network at initialisation.

    python benchmarks/quality.py                        # dino, dinov2, byol; the demo's length
    python benchmarks/quality.py --methods dino,dinov2 --minutes 10 -- optim.lr=1e-3

``--minutes M`` gives each objective the same wall-clock budget instead of the same length: a
probe of 20 steps measures its speed, and its run gets the number of steps that fit in M
minutes (the schedules then end with the run). Timings are of this machine: compare rows of
one invocation, on an idle machine.

A folder ``OUT/METHOD`` that already holds a finished run is evaluated as it is, not trained
again (``dinolab train`` on a finished run does nothing): a table can gather runs made one at a
time on the same machine. Minutes are the run's own, from its metrics.jsonl (first record to
last: training and its per-epoch k-NN monitor, not the start-up).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.nn import functional as F

from dinolab import auto
from dinolab.config import load_config
from dinolab.data.datasets import build_sources
from dinolab.data.transforms import EvalTransform
from dinolab.evaluation.commands import run_knn, run_linear
from dinolab.evaluation.features import extract_features
from dinolab.evaluation.knn import knn_accuracy
from dinolab.training.state import build_network, resolve_device

K, TEMPERATURE = 20, 0.07


def pixel_features(images: torch.utils.data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL images -> (pixels [N, H*W*C] in [0, 1], labels [N])."""
    pixels, labels = [], []
    for index in range(len(images)):  # type: ignore[arg-type]
        image, label = images[index]
        pixels.append(torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8))
        labels.append(label)
    return torch.stack(pixels).float() / 255, torch.tensor(labels)


def raw_pixels_knn(overrides: list[str]) -> float:
    config = load_config(None, overrides)
    sources = build_sources(config.data)
    train, train_labels = pixel_features(sources.knn_train)  # type: ignore[arg-type]
    test, test_labels = pixel_features(sources.knn_test)  # type: ignore[arg-type]
    mean = train.mean(dim=0)
    return knn_accuracy(F.normalize(train - mean, dim=-1), train_labels,
                        F.normalize(test - mean, dim=-1), test_labels, K, TEMPERATURE)["top1"]


def initial_knn(overrides: list[str]) -> float:
    """The demo network at initialisation, built as ``train`` builds it from the seed."""
    config = load_config(None, overrides)
    sources = build_sources(config.data)
    config, _ = auto.resolve(config, len(sources.train))  # type: ignore[arg-type]
    torch.manual_seed(config.train.seed)
    network = build_network(config, config.model.drop_path_rate)
    device = resolve_device(config.train.device)
    arguments = (EvalTransform(config.data), device, 512, config.data.num_workers, None)
    train = extract_features(network.backbone.to(device), sources.knn_train, *arguments)
    test = extract_features(network.backbone, sources.knn_test, *arguments)
    return knn_accuracy(*train, *test, K, TEMPERATURE)["top1"]


def fitted_length(method: str, minutes: float, run_dir: Path, overrides: list[str]) -> list[str]:
    """Overrides that make ``method``'s run last about ``minutes``: a 20-step probe measures its
    images/s, and the run gets that many steps, in 2 epochs (a monitored k-NN half-way)."""
    probe = run_dir.with_name(run_dir.name + "-probe")
    train(method, probe, overrides + ["train.epochs=1", "train.limit_steps_per_epoch=20",
                                      "run.log_every_steps=5", "eval.knn_train_limit=100",
                                      "eval.knn_test_limit=100"])
    speeds = [record["images_per_second"] for record in read_metrics(probe)
              if record["kind"] == "train"][1:]  # the first includes the start-up
    batch = OmegaConf.load(probe / "config.yaml").train.batch_size  # as the probe resolved it
    steps = int(minutes * 60 * sum(speeds) / len(speeds) / batch)
    return [f"train.limit_steps_per_epoch={max(steps // 2, 1)}", "train.epochs=2"]


def train(method: str, run_dir: Path, overrides: list[str]) -> None:
    """``dinolab train method=M`` in a subprocess, as a user runs it."""
    command = [sys.executable, "-m", "dinolab.cli", "train", f"method={method}",
               f"run.dir={run_dir}", "run.progress_bar=false", *overrides]
    subprocess.run(command, check=True)


def training_minutes(records: list[dict]) -> float:
    """Minutes from the run's first record (the k-NN at initialisation) to its last."""
    return (records[-1]["time"] - records[0]["time"]) / 60


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="dino,dinov2,byol")
    parser.add_argument("--minutes", type=float, default=0.0,
                        help="the same wall-clock budget for each objective (0: the same length)")
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--no-linear", action="store_true", help="skip the linear probe")
    parser.add_argument("overrides", nargs="*", help="key=value for every run (after --)")
    arguments = parser.parse_args()
    overrides = ["data.download=true", *arguments.overrides]
    rows = [("raw pixels (centred)", raw_pixels_knn(overrides), None, None, None),
            ("initialisation", initial_knn(overrides), None, None, None)]
    for method in arguments.methods.split(","):
        run_dir = arguments.out / method
        extra = (fitted_length(method, arguments.minutes, run_dir, overrides)
                 if arguments.minutes else [])
        train(method, run_dir, overrides + extra)
        records = read_metrics(run_dir)
        speeds = [record["images_per_second"] for record in records if record["kind"] == "train"]
        knn = run_knn(str(run_dir), ks=(K,), temperature=TEMPERATURE)[K]["top1"]
        linear = None if arguments.no_linear else run_linear(str(run_dir))
        rows.append((method, knn, linear, sum(speeds) / len(speeds), training_minutes(records)))

    print(f"\nFashion-MNIST, full splits; k-NN k={K} T={TEMPERATURE}; "
          f"{torch.get_num_threads()} threads; {time.strftime('%Y-%m-%d')}")
    print(f"| {'features':<22} | k-NN top-1 | linear top-1 | images/s | minutes |")
    print(f"| {'-' * 22} | ---------- | ------------ | -------- | ------- |")
    for name, knn, linear, speed, minutes in rows:
        cells = [f"{knn:.1f}%", "" if linear is None else f"{linear:.1f}%",
                 "" if speed is None else f"{speed:.0f}",
                 "" if minutes is None else f"{minutes:.1f}"]
        print(f"| {name:<22} | {cells[0]:>10} | {cells[1]:>12} | {cells[2]:>8} | {cells[3]:>7} |")


if __name__ == "__main__":
    main()
