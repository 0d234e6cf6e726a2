"""File-based sources: an image folder, a list of files, ImageNet's folder layout.

Nothing here decodes more than a few files at start: the listing is by name, and
``probe_decodable`` stops at the first file that decodes. Broken files are found, skipped and
reported while training (data/skipping.py).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from dinolab.config import DataConfig
from dinolab.data.images import (
    IMAGE_SUFFIXES,
    UNLABELLED,
    DataError,
    ImageFiles,
    Sources,
    holdout_sources,
    probe_decodable,
)

_HEADER_NAMES = {"path", "file", "filename", "image", "image_path"}


def image_paths(root: Path) -> list[Path]:
    """Every image file under ``root`` at any depth, sorted. Hidden files and folders (names
    starting with '.', such as .git or macOS's ._ files) are never entered or listed."""
    found: list[Path] = []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        found += [Path(folder, name) for name in names
                  if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def _existing_folder(path: str, what: str) -> Path:
    if not path:
        raise DataError(f"invalid value for data.root: {what} needs data.root")
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"invalid value for data.root: folder not found: {path}")
    return folder


def _listed_images(root: Path) -> list[Path]:
    paths = image_paths(root)
    if not paths:
        suffixes = ", ".join(sorted(suffix[1:] for suffix in IMAGE_SUFFIXES))
        raise DataError(f"invalid value for data.root: no images in {root} ({suffixes}, "
                        "at any depth)")
    return paths


def image_folder(config: DataConfig) -> Sources:
    """Every image under data.root, recursively. When all images sit in first-level class
    folders (at least two), those names are the labels and a fixed 10% is held out for k-NN."""
    root = _existing_folder(config.root, "data.source=folder")
    paths = _listed_images(root)
    classes = sorted({path.relative_to(root).parts[0] for path in paths})
    labelled = len(classes) >= 2 and all(len(path.relative_to(root).parts) >= 2
                                         for path in paths)
    if not labelled:
        files = ImageFiles(paths, [UNLABELLED] * len(paths))
        probe_decodable(files, str(root))
        return Sources(train=files)
    class_index = {name: index for index, name in enumerate(classes)}
    files = ImageFiles(paths, [class_index[path.relative_to(root).parts[0]] for path in paths])
    probe_decodable(files, str(root))
    return holdout_sources(files)


def imagenet(config: DataConfig) -> Sources:
    """ImageNet's layout: data.root/train/<class>/... and data.root/val/<class>/...; trains on
    data.split (default train), k-NN from train against val. Never downloaded (no licence-free
    source exists); data.root must hold the extracted folders."""
    root = _existing_folder(config.root, "data.source=imagenet")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"invalid value for data.root: {root} has no {split}/ folder "
                            "(ImageNet layout: train/<class>/*.JPEG, val/<class>/*.JPEG)")
    classes = sorted(entry.name for entry in (root / "train").iterdir()
                     if entry.is_dir() and not entry.name.startswith("."))
    class_index = {name: index for index, name in enumerate(classes)}

    def split_files(split: str) -> ImageFiles:
        folder = root / split
        paths = _listed_images(folder)
        unknown = {path.relative_to(folder).parts[0] for path in paths} - set(class_index)
        if unknown:
            raise DataError(f"{folder}: {', '.join(sorted(unknown)[:3])} are not class folders "
                            f"of {root / 'train'} (each image must sit in a class folder)")
        files = ImageFiles(paths, [class_index[path.relative_to(folder).parts[0]]
                                   for path in paths])
        probe_decodable(files, str(folder))
        return files

    train, val = split_files("train"), split_files("val")
    return Sources(train=val if config.split == "val" else train, knn_train=train, knn_test=val)


def _read_rows(path: Path) -> list[list[str]]:
    """A CSV file (path[,label], an optional header row) or a text file (one path per line,
    blank lines and '#' comments skipped) -> rows of cells."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv":
        rows = [[cell.strip() for cell in row] for row in csv.reader(text.splitlines()) if row]
        rows = [row for row in rows if row[0]]
        if rows and rows[0][0].lower() in _HEADER_NAMES:
            rows = rows[1:]
        return rows
    lines = (line.strip() for line in text.splitlines())
    return [[line] for line in lines if line and not line.startswith("#")]


def _labels(rows: list[list[str]]) -> list[int] | None:
    """The label column as class indices: integers as written, names in sorted order; None
    unless every row has one."""
    cells = [row[1] if len(row) > 1 else "" for row in rows]
    if not all(cells):
        return None
    if all(cell.lstrip("-").isdigit() for cell in cells):
        return [int(cell) for cell in cells]
    names = {name: index for index, name in enumerate(sorted(set(cells)))}
    return [names[cell] for cell in cells]


def file_list(config: DataConfig) -> Sources:
    """The files named in data.root, a text or CSV file; relative paths are resolved against
    the list's own folder, so a list travels with its images."""
    if not config.root:
        raise DataError("invalid value for data.root: data.source=filelist needs data.root, "
                        "the path of a .txt or .csv list of image files")
    list_path = Path(config.root)
    if not list_path.is_file():
        raise DataError(f"invalid value for data.root: file list not found: {config.root}")
    try:
        rows = _read_rows(list_path)
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{list_path}: not a text or CSV file list ({error})") from None
    if not rows:
        raise DataError(f"{list_path} lists no files")
    paths = [list_path.parent / Path(row[0]).expanduser() for row in rows]
    labels = _labels(rows)
    files = ImageFiles(paths, labels or [UNLABELLED] * len(paths))
    probe_decodable(files, str(list_path))
    if labels is None or len(set(labels)) < 2:
        return Sources(train=files)
    return holdout_sources(files)
