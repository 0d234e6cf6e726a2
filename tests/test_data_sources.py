"""Every data.source on small data written here, in each format's real on-disk layout.

The named data sets are read by torchvision's own classes. They check the MD5 of each file
against the published data set; the fake files written here have other checksums, so each test
puts the fake files' checksums in the class's list (monkeypatch, tests only): torchvision's
integrity check itself still runs, on the files it then reads.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinolab.config import DATA_SOURCES, ConfigError, DataConfig, load_config
from dinolab.data.datasets import SOURCES, build_sources
from dinolab.data.images import UNLABELLED, DataError

RNG = np.random.default_rng(0)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _labels(dataset) -> list[int]:  # type: ignore[no-untyped-def]
    return [dataset[i][1] for i in range(len(dataset))]


def test_every_configured_source_has_a_reader() -> None:
    assert set(SOURCES) == set(DATA_SOURCES)


# ------------------------------------------------------------------------------ STL-10


def _fake_stl10(root: Path, monkeypatch: pytest.MonkeyPatch, sizes: dict[str, int]) -> None:
    """stl10_binary/{train,unlabeled,test}_X.bin (uint8 [N, 3, 96, 96], column-major images)
    and {train,test}_y.bin (labels 1..10), as torchvision.datasets.STL10 reads them."""
    from torchvision.datasets import STL10

    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    for split, count in sizes.items():
        images = RNG.integers(0, 256, (count, 3, 96, 96), dtype=np.uint8)
        images[:, 0, 0, 0] = np.arange(count)  # a mark to tell images apart
        (folder / f"{split}_X.bin").write_bytes(images.tobytes())
        if split != "unlabeled":
            labels = (np.arange(count) % 10 + 1).astype(np.uint8)
            (folder / f"{split}_y.bin").write_bytes(labels.tobytes())
    monkeypatch.setattr(STL10, "train_list", [
        [name, _md5(folder / name)] for name in ("train_X.bin", "train_y.bin", "unlabeled_X.bin")])
    monkeypatch.setattr(STL10, "test_list", [
        [name, _md5(folder / name)] for name in ("test_X.bin", "test_y.bin")])


@pytest.mark.parametrize(("split", "size", "labelled"), [
    ("", 4 + 6, False), ("train+unlabeled", 10, False), ("unlabeled", 6, False),
    ("train", 4, True), ("test", 3, True)])
def test_stl10_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, split: str, size: int,
                      labelled: bool) -> None:
    _fake_stl10(tmp_path, monkeypatch, {"train": 4, "unlabeled": 6, "test": 3})
    sources = build_sources(DataConfig(source="stl10", root=str(tmp_path), split=split))
    assert len(sources.train) == size  # type: ignore[arg-type]
    image, label = sources.train[size - 1]
    assert image.size == (96, 96) and image.mode == "RGB"
    assert (label >= 0) == labelled
    assert _labels(sources.knn_train) == [0, 1, 2, 3]  # train_y 1..4, zero-based
    assert _labels(sources.knn_test) == [0, 1, 2]


def test_stl10_train_plus_unlabeled_marks_the_unlabeled_part(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch):
    _fake_stl10(tmp_path, monkeypatch, {"train": 4, "unlabeled": 6, "test": 3})
    sources = build_sources(DataConfig(source="stl10", root=str(tmp_path)))
    assert _labels(sources.train) == [0, 1, 2, 3] + [UNLABELLED] * 6


def test_stl10_with_real_checksums_stops_with_one_line(tmp_path: Path) -> None:
    """Without the test's checksums torchvision finds the fake files corrupt: a DataError (no
    network is touched: data.download is false)."""
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    (folder / "train_X.bin").write_bytes(b"\0" * 27648)
    with pytest.raises(DataError, match="cannot read STL-10 in .*data.download=true") as error:
        build_sources(DataConfig(source="stl10", root=str(tmp_path)))
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------ CIFAR


def _fake_cifar(root: Path, monkeypatch: pytest.MonkeyPatch, hundred: bool) -> None:
    """Pickled batches of {"data": uint8 [N, 3072], "labels" or "fine_labels": [N]} and a meta
    pickle, in cifar-10-batches-py/ or cifar-100-python/, as torchvision's CIFAR classes read."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR100 if hundred else CIFAR10
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    label_key = "fine_labels" if hundred else "labels"
    train_names = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    test_names = ["test"] if hundred else ["test_batch"]
    for index, name in enumerate(train_names + test_names):
        data = RNG.integers(0, 256, (3, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": data, label_key: [index, index + 1, index + 2]}, handle)
    meta = cls.meta["filename"]
    with open(folder / meta, "wb") as handle:
        pickle.dump({cls.meta["key"]: [f"class {i}" for i in range(100 if hundred else 10)]},
                    handle)
    monkeypatch.setattr(cls, "train_list", [[n, _md5(folder / n)] for n in train_names])
    monkeypatch.setattr(cls, "test_list", [[n, _md5(folder / n)] for n in test_names])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / meta)})


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    hundred = name == "cifar100"
    _fake_cifar(tmp_path, monkeypatch, hundred)
    sources = build_sources(DataConfig(source=name, root=str(tmp_path)))
    train_size = 3 if hundred else 15
    assert len(sources.train) == train_size  # type: ignore[arg-type]
    image, _ = sources.train[0]
    assert image.size == (32, 32) and image.mode == "RGB"
    assert sources.knn_train is sources.train
    assert _labels(sources.knn_test) == ([1, 2, 3] if hundred else [5, 6, 7])
    test_split = build_sources(DataConfig(source=name, root=str(tmp_path), split="test"))
    assert len(test_split.train) == 3  # type: ignore[arg-type]


def test_cifar_missing_stops_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read CIFAR-10"):
        build_sources(DataConfig(source="cifar10", root=str(tmp_path)))
    with pytest.raises(DataError, match="folder not found"):
        build_sources(DataConfig(source="cifar10", root=str(tmp_path / "absent")))


# ------------------------------------------------------------------------------ MNIST


def _write_raw_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                    *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_from_torchvision_raw_folder(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, count in (("train", 7), ("t10k", 5)):
        _write_raw_idx(raw / f"{prefix}-images-idx3-ubyte",
                       RNG.integers(0, 256, (count, 28, 28)))
        _write_raw_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(count) % 10)
    sources = build_sources(DataConfig(source="mnist", root=str(tmp_path)))
    assert len(sources.train) == 7 and len(sources.knn_test) == 5  # type: ignore[arg-type]
    image, label = sources.train[6]
    assert image.mode == "L" and image.size == (28, 28) and label == 6


def test_fashion_mnist_test_split(tmp_path: Path) -> None:
    from conftest import make_fashion_mnist

    make_fashion_mnist(tmp_path, num_train=20, num_test=8)
    sources = build_sources(DataConfig(source="fashion-mnist", root=str(tmp_path), split="test"))
    assert len(sources.train) == 8 and len(sources.knn_train) == 20  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ ImageNet


def test_imagenet_layout(tmp_path: Path) -> None:
    for split, count in (("train", 3), ("val", 2)):
        for name in ("n01440764", "n01443537"):
            (tmp_path / split / name).mkdir(parents=True)
            for index in range(count):
                Image.new("RGB", (40, 30)).save(tmp_path / split / name / f"{index}.JPEG")
    sources = build_sources(DataConfig(source="imagenet", root=str(tmp_path)))
    assert len(sources.train) == 6 and sources.knn_train is sources.train  # type: ignore[arg-type]
    assert _labels(sources.knn_test) == [0, 0, 1, 1]
    on_val = build_sources(DataConfig(source="imagenet", root=str(tmp_path), split="val"))
    assert on_val.train is on_val.knn_test
    (tmp_path / "val" / "n99").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "n99" / "x.JPEG")
    with pytest.raises(DataError, match="n99 are not class folders"):
        build_sources(DataConfig(source="imagenet", root=str(tmp_path)))


def test_imagenet_without_val_stops_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no val/ folder"):
        build_sources(DataConfig(source="imagenet", root=str(tmp_path)))


# ------------------------------------------------------------------------------ file lists


def _images(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{index}.png" for index in range(count)]
    for index, path in enumerate(paths):
        Image.new("RGB", (16, 12), (index * 30, 0, 0)).save(path)
    return paths


def test_text_file_list_resolves_relative_paths_against_its_folder(tmp_path: Path) -> None:
    paths = _images(tmp_path / "shots", 3)
    listing = tmp_path / "lists" / "train.txt"
    listing.parent.mkdir()
    listing.write_text(f"# my images\n../shots/0.png\n\n{paths[1]}\n../shots/2.png\n")
    sources = build_sources(DataConfig(source="filelist", root=str(listing)))
    assert sources.train.paths == [listing.parent / "../shots/0.png", paths[1],  # type: ignore[attr-defined]
                                   listing.parent / "../shots/2.png"]
    assert sources.knn_train is None and sources.train[2][0].getpixel((0, 0)) == (60, 0, 0)


def test_csv_file_list_with_header_and_class_names(tmp_path: Path) -> None:
    _images(tmp_path, 6)
    rows = [f"{index}.png,{'cat' if index % 2 else 'dog'}" for index in range(6)]
    (tmp_path / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    sources = build_sources(DataConfig(source="filelist", root=str(tmp_path / "list.csv")))
    assert _labels(sources.train) == [1, 0, 1, 0, 1, 0]  # cat=0, dog=1 (sorted names)
    assert len(sources.knn_train) + len(sources.knn_test) == 6  # type: ignore[arg-type]


def test_csv_file_list_without_labels_and_integer_labels(tmp_path: Path) -> None:
    _images(tmp_path, 4)
    (tmp_path / "plain.csv").write_text("0.png\n1.png\n2.png\n3.png\n")
    plain = build_sources(DataConfig(source="filelist", root=str(tmp_path / "plain.csv")))
    assert plain.knn_train is None and _labels(plain.train) == [UNLABELLED] * 4
    (tmp_path / "numbers.csv").write_text("0.png,7\n1.png,3\n2.png,7\n3.png,3\n")
    numbers = build_sources(DataConfig(source="filelist", root=str(tmp_path / "numbers.csv")))
    assert _labels(numbers.train) == [7, 3, 7, 3]


@pytest.mark.parametrize(("content", "message"), [
    (None, "file list not found"), ("# nothing\n\n", "lists no files"),
    ("a.png\nb.png\n", "no file in .* decodes as an image")])
def test_bad_file_lists_stop_with_one_line(tmp_path: Path, content: str | None,
                                           message: str) -> None:
    listing = tmp_path / "list.txt"
    if content is not None:
        listing.write_text(content)
    with pytest.raises(DataError, match=message) as error:
        build_sources(DataConfig(source="filelist", root=str(listing)))
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------ config


def test_split_is_checked_per_source() -> None:
    assert load_config(None, ["data.source=stl10", "data.split=unlabeled"]).data.split
    for overrides in (["data.source=stl10", "data.split=val"],
                      ["data.source=folder", "data.split=train"],
                      ["data.max_bad_fraction=1.5"]):
        with pytest.raises(ConfigError, match="data.split|data.max_bad_fraction"):
            load_config(None, overrides)
