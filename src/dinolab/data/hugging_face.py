"""Hugging Face datasets as a source (data.source=hf; the optional extra ``dinolab[hf]``).

data.root is a folder written by ``save_to_disk`` (a DatasetDict of splits, or one Dataset), a
folder of parquet files (splits named by their files as on the Hub, train-*.parquet,
test-*.parquet; all in train otherwise), or a Hub name, which ``datasets`` downloads and caches
on first use. Training reads data.split (default train); the k-NN monitor compares the
labelled train split with a labelled test (or validation) split, and without one holds out a
fixed 10% of the training split, as for a folder of class folders.

The images stay encoded in the dataset's Arrow files and are decoded by ``DatasetRows`` as
files are, so that a row that does not decode is skipped, replaced and counted like a broken
file (data/skipping.py), and a resumed run reads the same rows (data/loader.py).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from dinolab.config import DataConfig
from dinolab.data.images import UNLABELLED, DataError, DatasetRows, Sources, probe_decodable

DEFAULT_SPLIT = "train"
TEST_SPLITS = ("test", "validation", "valid", "val")  # k-NN's test split: the first present
LABEL_NAMES = ("label", "labels")
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes at the top


def datasets_package() -> ModuleType:
    """The ``datasets`` module, or the one-line error that says how to install it."""
    try:
        import datasets
    except ImportError:
        raise DataError("data.source=hf needs the datasets package: pip install "
                        "'dinolab[hf]'") from None
    return datasets


def load_splits(root: str) -> dict[str, Any]:
    """data.root -> {split name: datasets.Dataset}; one saved Dataset is the split ""."""
    datasets = datasets_package()
    if not root:
        raise DataError("invalid value for data.root: data.source=hf needs data.root (a folder "
                        "written by save_to_disk, a folder of parquet files, or a Hub name)")
    folder = Path(root)
    if folder.is_dir() and any((folder / marker).is_file() for marker in SAVED_MARKERS):
        loaded = datasets.load_from_disk(str(folder))
    elif folder.is_dir():
        if not any(folder.rglob("*.parquet")):
            raise DataError(f"invalid value for data.root: {root} holds neither a dataset "
                            "written by save_to_disk nor parquet files")
        loaded = datasets.load_dataset("parquet", data_dir=str(folder))
    elif folder.exists() or root.startswith(("/", ".", "~")):
        raise DataError(f"invalid value for data.root: folder not found: {root}")
    else:
        try:
            loaded = datasets.load_dataset(root)
        # The Hub's failures come as many types (no network, an unknown or gated name, a
        # script-based set): each is reported in one line.
        except Exception as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise DataError(f"cannot load {root!r} from the Hugging Face Hub (no folder of "
                            f"that name here either): {reason}") from None
    if isinstance(loaded, datasets.Dataset):
        return {"": loaded}
    return dict(loaded)


def _is_image(feature: Any, datasets: ModuleType) -> bool:
    """datasets' Image feature, or a struct of encoded bytes (a parquet file written by another
    tool: {"bytes": binary, "path": string})."""
    return isinstance(feature, datasets.Image) or (isinstance(feature, dict)
                                                   and "bytes" in feature)


def image_column(split: Any, chosen: str, where: str) -> str:
    """data.image_column, or the first column that holds images."""
    datasets = datasets_package()
    features = split.features
    if chosen:
        if chosen not in features:
            raise DataError(f"invalid value for data.image_column: {where} has no column "
                            f"{chosen!r} (its columns: {', '.join(features)})")
        if not _is_image(features[chosen], datasets):
            raise DataError(f"invalid value for data.image_column: {where}'s column {chosen!r} "
                            f"holds {features[chosen]}, not images")
        return chosen
    found = [name for name, feature in features.items() if _is_image(feature, datasets)]
    if not found:
        raise DataError(f"{where} has no image column (an Image feature, or {{bytes, path}} "
                        f"structs) among {', '.join(features)}; name it with data.image_column")
    return found[0]


def label_column(split: Any, chosen: str, where: str) -> str | None:
    """data.label_column, or the first ClassLabel column, or one named label or labels; a
    column of one class index or name a row (never a list of them)."""
    datasets = datasets_package()
    features = split.features

    def scalar(name: str) -> bool:
        return isinstance(features[name], (datasets.ClassLabel, datasets.Value))

    if chosen:
        if chosen not in features or not scalar(chosen):
            raise DataError(f"invalid value for data.label_column: {where} has no column "
                            f"{chosen!r} of one label a row (its columns: {', '.join(features)})")
        return chosen
    class_labels = [name for name, feature in features.items()
                    if isinstance(feature, datasets.ClassLabel)]
    named = [name for name in LABEL_NAMES if name in features and scalar(name)]
    return next(iter(class_labels + named), None)


def read_labels(splits: dict[str, Any], column: str | None) -> dict[str, np.ndarray]:
    """Each split's labels as int64 [N], UNLABELLED where missing (or no column). Integers (and
    ClassLabel's) are kept; names become indices in sorted order, the same in every split."""
    raw = {name: (split.with_format("arrow")[column].to_pylist()
                  if column in split.features else [None] * len(split))
           for name, split in splits.items()}
    values = {value for column_values in raw.values() for value in column_values
              if value is not None}
    if all(isinstance(value, int) for value in values):
        index = {value: value for value in values}
    else:
        index = {value: position for position, value in enumerate(sorted(values, key=str))}
    return {name: np.array([UNLABELLED if value is None or index[value] < 0 else index[value]
                            for value in column_values], dtype=np.int64)
            for name, column_values in raw.items()}


def _labelled(labels: np.ndarray) -> bool:
    return len(np.unique(labels[labels != UNLABELLED])) >= 2


def _training_split(splits: dict[str, Any], chosen: str, root: str) -> str:
    if "" in splits:
        if chosen:
            raise DataError(f"invalid value for data.split: {root} holds one Dataset, not a "
                            "DatasetDict of splits; leave data.split unset")
        return ""
    name = chosen or DEFAULT_SPLIT
    if name not in splits and not chosen and len(splits) == 1:
        return next(iter(splits))
    if name not in splits:
        raise DataError(f"invalid value for data.split: {root} has no split {name!r} (its "
                        f"splits: {', '.join(splits)})")
    return name


def hugging_face(config: DataConfig, holdout_fraction: float = 0.1) -> Sources:
    """Training images of data.split, and the k-NN splits when there are labels."""
    splits = load_splits(config.root)
    train_name = _training_split(splits, config.split, config.root)
    where = f"{config.root}[{train_name}]" if train_name else config.root
    images = image_column(splits[train_name], config.image_column, where)
    labels = read_labels(splits, label_column(splits[train_name], config.label_column, where))

    def rows(name: str) -> DatasetRows:
        datasets = datasets_package()
        split = splits[name].select_columns([images])
        if isinstance(split.features[images], datasets.Image):
            split = split.cast_column(images, datasets.Image(decode=False))
        return DatasetRows(split, images, labels[name],
                           f"{config.root}[{name}]" if name else config.root)

    def labelled(name: str) -> bool:
        return (name in splits and images in splits[name].features
                and _labelled(labels[name]))

    train = rows(train_name)
    if not len(train):
        raise DataError(f"{where} has no rows")
    probe_decodable(train, where)
    knn_train = DEFAULT_SPLIT if labelled(DEFAULT_SPLIT) else train_name
    test = next((name for name in TEST_SPLITS if name != knn_train and labelled(name)), None)
    if test is not None and labelled(knn_train):
        return Sources(train=train, knn_train=train if knn_train == train_name
                       else rows(knn_train), knn_test=rows(test))
    if not labelled(train_name):
        return Sources(train=train)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    num_test = max(1, int(len(train) * holdout_fraction))
    return Sources(train=train, knn_train=Subset(train, sorted(order[num_test:])),
                   knn_test=Subset(train, sorted(order[:num_test])))
