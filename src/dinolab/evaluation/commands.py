"""The evaluation commands behind ``dinolab knn|linear|embed|export``: load, extract (or read
the cache), evaluate, print. The CLI only parses and calls these."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from dinolab.data.transforms import EvalTransform
from dinolab.evaluation.cache import cache_key, cached_features
from dinolab.evaluation.embedding import (
    check_destination,
    plot_map,
    principal_components,
    write_embeddings,
)
from dinolab.evaluation.export import export_backbone
from dinolab.evaluation.features import block_features, extract_features
from dinolab.evaluation.inputs import (
    EvaluationInputs,
    all_images,
    labelled_splits,
    prepare_inputs,
)
from dinolab.evaluation.knn import knn_accuracies
from dinolab.evaluation.linear import ProbeSettings, linear_probe

OUTPUT = "output"  # the backbone's own output: final-normed [CLS] or pooled feature
RESULTS = "evaluation.json"  # a run folder's full-split figures (dinolab compare shows them)


def record_result(path: str, weights: str, data_path: str | None, overrides: Sequence[str],
                  values: dict[str, Any]) -> None:
    """Keep a run folder's own figures (its teacher on its own data) in ``evaluation.json``;
    figures on other data, of the student, or of a file are only printed."""
    folder = Path(path)
    if not folder.is_dir() or weights != "teacher" or data_path or overrides:
        return
    file = folder / RESULTS
    results = json.loads(file.read_text()) if file.is_file() else {}
    file.write_text(json.dumps(results | values, indent=1) + "\n")


def features_of(inputs: EvaluationInputs, split: str, images: Dataset, kind: str = OUTPUT,
                blocks: int = 1, average_patches: bool = False,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised features [N, D] and labels [N] of ``images``, cached (see cache.py)."""
    config = inputs.config
    key = cache_key(inputs.info, config.data, split, kind, inputs.autocast_dtype,
                    len(images))  # type: ignore[arg-type]
    forward = block_features(inputs.backbone, blocks, average_patches)

    def extract() -> tuple[torch.Tensor, torch.Tensor]:
        return extract_features(inputs.backbone, images, EvalTransform(config.data),
                                inputs.device, config.eval.batch_size, config.data.num_workers,
                                inputs.autocast_dtype, forward=forward, normalize=False)

    return cached_features(inputs.info, key, extract)


def _describe(inputs: EvaluationInputs) -> str:
    info = inputs.info
    position = f", step {info.step}" if info.step is not None else ""
    return f"{info.model_name} ({info.weights}{position}) from {info.file}"


def run_knn(path: str, weights: str = "teacher", data_path: str | None = None,
            overrides: Sequence[str] = (), ks: Sequence[int] = (10, 20, 100, 200),
            temperature: float = 0.07) -> dict[int, dict[str, float]]:
    """Weighted k-NN on the labelled splits; prints a table and returns {k: accuracies}."""
    inputs = prepare_inputs(path, weights, data_path, list(overrides))
    train_images, test_images = labelled_splits(inputs.config)
    train_features, train_labels = features_of(inputs, "knn-train", train_images)
    test_features, test_labels = features_of(inputs, "knn-test", test_images)
    results = knn_accuracies(
        F.normalize(train_features.to(inputs.device), dim=-1), train_labels.to(inputs.device),
        F.normalize(test_features.to(inputs.device), dim=-1), test_labels.to(inputs.device),
        ks, temperature)
    print(f"weighted k-NN, T={temperature}: {_describe(inputs)}; {len(train_labels)} train, "
          f"{len(test_labels)} test images")
    print(f"{'k':>5} {'top-1':>7} {'top-5':>7}")
    for k, accuracy in results.items():
        every = f"  (k > {len(train_labels)}: every train image votes)" \
            if k > len(train_labels) else ""
        print(f"{k:>5} {accuracy['top1']:>6.1f}% {accuracy['top5']:>6.1f}%{every}")
    record_result(path, weights, data_path, overrides,
                  {f"knn_top1_k{k}": accuracy["top1"] for k, accuracy in results.items()})
    return results


def default_blocks(inputs: EvaluationInputs) -> int:
    """4 for a transformer with a [CLS] token (the reference's ViT-S protocol), else 1."""
    backbone = inputs.backbone
    has_tokens = getattr(backbone, "num_prefix_tokens", 0) and hasattr(backbone, "blocks")
    return min(4, len(backbone.blocks)) if has_tokens else 1  # type: ignore[arg-type]


def default_kind(inputs: EvaluationInputs) -> str:
    blocks = default_blocks(inputs)
    return OUTPUT if blocks == 1 else f"blocks{blocks}"


def run_linear(path: str, weights: str = "teacher", data_path: str | None = None,
               overrides: Sequence[str] = (), blocks: int | None = None,
               average_patches: bool = False, settings: ProbeSettings | None = None) -> float:
    """Linear probe on the labelled splits; prints the sweep and returns the test top-1."""
    inputs = prepare_inputs(path, weights, data_path, list(overrides))
    settings = settings or ProbeSettings()
    blocks = blocks or default_blocks(inputs)
    kind = OUTPUT if blocks == 1 and not average_patches else (
        f"blocks{blocks}" + ("-avgpool" if average_patches else ""))
    train_images, test_images = labelled_splits(inputs.config)
    train = features_of(inputs, "knn-train", train_images, kind, blocks, average_patches)
    test = features_of(inputs, "knn-test", test_images, kind, blocks, average_patches)
    train_features, train_labels = (tensor.to(inputs.device) for tensor in train)
    test_features, test_labels = (tensor.to(inputs.device) for tensor in test)
    result = linear_probe(train_features, train_labels, test_features, test_labels, settings)
    what = "the backbone's output" if kind == OUTPUT else (
        f"[CLS] of the last {blocks} block(s){' + mean patch token' if average_patches else ''}")
    print(f"linear probe on {train_features.shape[1]} features ({what}): {_describe(inputs)}")
    print(f"{settings.epochs} epochs; learning rate chosen on 10% of the "
          f"{len(train_labels)} train images")
    print(f"{'lr':>8} {'validation top-1':>17}")
    for rate, accuracy in zip(result.learning_rates, result.validation_top1, strict=True):
        marker = "  <- chosen" if rate == result.best_learning_rate else ""
        print(f"{rate:>8g} {accuracy:>16.1f}%{marker}")
    print(f"test ({len(test_labels)} images): top-1 {result.test_top1:.1f}%, "
          f"top-5 {result.test_top5:.1f}% (lr {result.best_learning_rate:g})")
    if kind == default_kind(inputs):
        record_result(path, weights, data_path, overrides, {"linear_top1": result.test_top1})
    return result.test_top1


def run_embed(path: str, out: str, weights: str = "teacher", data_path: str | None = None,
              overrides: Sequence[str] = (), split: str = "train",
              plot: str | None = None) -> Path:
    """Embeddings of every image of ``split`` to ``out`` (.npz or .parquet), and a PCA map."""
    destination = Path(out).expanduser()
    check_destination(destination)
    inputs = prepare_inputs(path, weights, data_path, list(overrides))
    name, images = all_images(inputs.config, split)
    features, labels = features_of(inputs, name, images)
    paths = getattr(images, "paths", None)
    write_embeddings(destination, features, labels, [str(p) for p in paths] if paths else None)
    print(f"{len(labels)} embeddings of width {features.shape[1]} ({_describe(inputs)}) "
          f"written to {destination}")
    if plot:
        title = f"{inputs.info.model_name}, {inputs.info.weights}: PCA of {len(labels)} images"
        plot_map(principal_components(features), labels, Path(plot).expanduser(), title)
        print(f"PCA map written to {plot}")
    return destination


def run_export(path: str, out: str, weights: str = "teacher") -> Path:
    destination, info = export_backbone(path, out, weights)
    print(f"{info.model_name} ({info.weights}) from {info.file} exported to {destination} "
          f"and {destination.with_suffix('.json')}")
    return destination
