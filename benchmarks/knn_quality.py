"""k-NN quality of a finished run on the full labelled splits, against its own initialisation.

The training loop's k-NN monitor may use subsets (the demo: 10,000 train against 2,000 test
images) to stay fast. This script measures the run's final teacher and the same network at
initialisation (rebuilt from the run's seed, as ``train`` builds it) on every labelled image:

    python benchmarks/knn_quality.py runs/demo
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from dinolab.config import from_dict
from dinolab.data.datasets import build_sources
from dinolab.data.transforms import EvalTransform
from dinolab.evaluation.features import extract_features
from dinolab.evaluation.knn import knn_accuracy
from dinolab.training.checkpoint import LATEST, load_checkpoint
from dinolab.training.state import build_network, resolve_device, resolve_precision


def main(run_dir: Path) -> None:
    checkpoint = load_checkpoint(run_dir / LATEST)
    config = from_dict(checkpoint["config"])
    sources = build_sources(config.data)
    if sources.knn_train is None or sources.knn_test is None:
        raise SystemExit(f"{run_dir}: the data set has no labels")
    device = resolve_device(config.train.device)
    dtype = resolve_precision(config.train.precision, device)
    transform = EvalTransform(config.data)
    torch.manual_seed(config.train.seed)  # train() seeds, then builds the student first
    initial = build_network(config, config.model.drop_path_rate)
    trained = build_network(config, 0.0, student=False)
    trained.load_state_dict(checkpoint["teacher"])
    print(f"{run_dir}: {len(sources.knn_train)} train, {len(sources.knn_test)} test images, "  # type: ignore[arg-type]
          f"k={config.eval.knn_k}, T={config.eval.knn_temperature}")
    for name, network in (("initialisation", initial), ("trained teacher", trained)):
        started = time.perf_counter()
        network.to(device)
        arguments = (transform, device, 512, config.data.num_workers, dtype)
        train_features, train_labels = extract_features(network.backbone, sources.knn_train,
                                                        *arguments)
        test_features, test_labels = extract_features(network.backbone, sources.knn_test,
                                                      *arguments)
        accuracy = knn_accuracy(train_features, train_labels, test_features, test_labels,
                                config.eval.knn_k, config.eval.knn_temperature)
        print(f"{name:>16}: top-1 {accuracy['top1']:.1f}%  top-5 {accuracy['top5']:.1f}%  "
              f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo"))
