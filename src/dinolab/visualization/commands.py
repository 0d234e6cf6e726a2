"""The commands behind ``dinolab attention|features|plot``: load, draw, say where the files are.
The CLI only parses and calls these."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dinolab.evaluation.loading import load_backbone
from dinolab.visualization.attention import DEFAULT_THRESHOLD, write_attention_maps
from dinolab.visualization.pca import write_feature_maps
from dinolab.visualization.plots import plot_run


def _report(written: list[Path], out: str, what: str) -> None:
    print(f"{what}: {len(written)} PNG files in {out}; all images at a glance: {written[-1]}")


def run_attention(path: str, images: Sequence[str], out: str, weights: str = "teacher",
                  threshold: float = DEFAULT_THRESHOLD, size: int | None = None) -> list[Path]:
    backbone, info = load_backbone(path, weights)
    written = write_attention_maps(backbone, info.config, images, Path(out), threshold, size)
    _report(written, out, f"attention of {info.model_name} ({info.weights}), "
                          f"masks keep {threshold:.0%} of the mass")
    return written


def run_features(path: str, images: Sequence[str], out: str, weights: str = "teacher",
                 size: int | None = None, keep_background: bool = False) -> list[Path]:
    backbone, info = load_backbone(path, weights)
    written = write_feature_maps(backbone, info.config, images, Path(out), size,
                                 remove_background=not keep_background)
    _report(written, out, f"PCA of {info.model_name}'s patch features ({info.weights})")
    return written


def run_plot(run_dir: str, out: str | None = None) -> Path:
    written = plot_run(Path(run_dir), Path(out) if out else None)
    print(f"curves of {run_dir}: {written}")
    return written
