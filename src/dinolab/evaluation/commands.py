"""The evaluation commands behind ``dinolab knn|linear|embed|export``: load, extract (or read
the cache), evaluate, print. The CLI only parses and calls these."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from dinolab.config import ConfigError
from dinolab.data.transforms import EvalTransform
from dinolab.evaluation.cache import cache_key, cached_features
from dinolab.evaluation.embedding import (
    check_destination,
    plot_map,
    principal_components,
    write_embeddings,
)
from dinolab.evaluation.export import export_backbone, safetensors_destination
from dinolab.evaluation.features import block_features, extract_features
from dinolab.evaluation.hub import hub_destination, push_folder, write_hub_folder
from dinolab.evaluation.inputs import (
    EvaluationInputs,
    all_images,
    labelled_splits,
    prepare_inputs,
)
from dinolab.evaluation.knn import knn_accuracies
from dinolab.evaluation.linear import ProbeSettings, linear_probe
from dinolab.evaluation.loading import load_backbone
from dinolab.evaluation.onnx_export import (
    INPUT_NAME,
    OUTPUT_NAME,
    export_onnx,
    onnx_destination,
)
from dinolab.evaluation.results import record_result

OUTPUT = "output"  # the backbone's own output: final-normed [CLS] or pooled feature


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


def run_export(path: str, weights: str = "teacher", out: str | None = None,
               hub: str | None = None, onnx: str | None = None,
               push: str | None = None) -> list[Path]:
    """Any of the three forms from one load of the backbone -> the files and folders written.
    Every argument is checked before the backbone is loaded; the upload comes last."""
    if not (out or hub or onnx):
        raise ConfigError("export needs --out FILE.safetensors, --hub DIR or --onnx FILE.onnx "
                          "(one or several)")
    if push and not hub:
        raise ConfigError(f"--push {push} uploads a --hub folder: give --hub DIR too")
    safetensors_file = safetensors_destination(out) if out else None
    hub_folder = hub_destination(hub) if hub else None
    onnx_file = onnx_destination(onnx) if onnx else None
    backbone, info = load_backbone(path, weights)
    source = f"{info.model_name} ({info.weights}) from {info.file}"
    written: list[Path] = []
    if hub_folder:  # first: it refuses an export as its source before anything is written
        write_hub_folder(backbone, info, hub_folder, push)
        print(f"{source} exported to {hub_folder} (timm: local-dir:{hub_folder})")
        written.append(hub_folder)
    if safetensors_file:
        sidecar = export_backbone(backbone, info, safetensors_file)
        print(f"{source} exported to {safetensors_file} and {sidecar}")
        written.append(safetensors_file)
    if onnx_file:
        shape = ", ".join(str(side) for side in export_onnx(backbone, info, onnx_file))
        print(f"{source} exported to {onnx_file} (input {INPUT_NAME!r} [batch, {shape}], "
              f"output {OUTPUT_NAME!r} [batch, width])")
        written.append(onnx_file)
    if hub_folder and push:
        print(f"{hub_folder} pushed to {push_folder(hub_folder, push)} (timm: hf-hub:{push})")
    return written
