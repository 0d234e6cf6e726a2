"""Embeddings to files, and a 2-D PCA map of them.

Files: ``.npz`` (numpy only) holds ``embeddings`` [N, D] float32, ``labels`` [N] int64 (-1 where
unknown) and ``paths`` [N] (strings; only for image files); ``np.load`` reads it without
pickle. ``.parquet`` (needs pyarrow) holds one row per image: ``path`` (or ``index``), ``label``
and ``embedding`` (a list of D float32). The embeddings are the backbone's output as it is,
not L2-normalised: normalise them for cosine similarity, as k-NN does.

The map projects the embeddings on their two first principal components (eigenvectors of the
covariance, which is D x D whatever the number of images) and colours each point by its label.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dinolab.config import ConfigError

FORMATS = (".npz", ".parquet")


def check_destination(path: Path) -> None:
    """Fail before any extraction on a format dinolab cannot write here."""
    if path.suffix not in FORMATS:
        raise ConfigError(f"--out {path}: the embeddings go to {' or '.join(FORMATS)}")
    if path.suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ConfigError("writing .parquet needs pyarrow (pip install pyarrow), "
                              "or write .npz") from None


def write_embeddings(path: Path, embeddings: torch.Tensor, labels: torch.Tensor,
                     paths: list[str] | None) -> None:
    """embeddings [N, D], labels [N]; ``paths`` one per row when the images are files."""
    check_destination(path)
    values = embeddings.float().numpy()
    label_values = labels.long().numpy()
    if path.suffix == ".npz":
        arrays = {"embeddings": values, "labels": label_values}
        if paths is not None:
            arrays["paths"] = np.array(paths, dtype=str)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **arrays)  # type: ignore[arg-type]
        return
    import pyarrow as arrow
    import pyarrow.parquet as parquet

    columns = {"path": paths} if paths is not None else {"index": np.arange(len(values))}
    flat = arrow.array(values.reshape(-1))
    columns["label"] = label_values  # type: ignore[assignment]
    columns["embedding"] = arrow.FixedSizeListArray.from_arrays(flat, values.shape[1])  # type: ignore[assignment]
    path.parent.mkdir(parents=True, exist_ok=True)
    parquet.write_table(arrow.table(columns), str(path))


def principal_components(embeddings: torch.Tensor, count: int = 2) -> torch.Tensor:
    """[N, D] -> [N, count]: coordinates on the ``count`` directions of largest variance."""
    centred = embeddings.double() - embeddings.double().mean(dim=0)
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    return (centred @ vectors[:, -count:].flip(-1)).float()


def plot_map(points: torch.Tensor, labels: torch.Tensor, path: Path, title: str) -> None:
    """points [N, 2], labels [N] (-1: unlabelled, drawn grey) -> a PNG scatter plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        from matplotlib import pyplot
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'dinolab[viz]'") from None
    figure, axes = pyplot.subplots(figsize=(7, 6), dpi=120)
    x, y = points[:, 0].numpy(), points[:, 1].numpy()
    unlabelled = (labels < 0).numpy()
    if unlabelled.any():
        axes.scatter(x[unlabelled], y[unlabelled], s=4, c="lightgrey", label="no label")
    classes = sorted(set(labels[labels >= 0].tolist()))
    colours = pyplot.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for position, label in enumerate(classes):
        chosen = (labels == label).numpy()
        axes.scatter(x[chosen], y[chosen], s=4, color=colours(position % colours.N),
                     label=str(label))
    if 0 < len(classes) <= 20:
        axes.legend(markerscale=3, fontsize="small", title="label", loc="best")
    axes.set(title=title, xlabel="principal component 1", ylabel="principal component 2")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, bbox_inches="tight")
    pyplot.close(figure)
