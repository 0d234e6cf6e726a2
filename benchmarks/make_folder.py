"""Write a class-folder subset of Fashion-MNIST: the small labelled folders of the quality work.

    python benchmarks/make_folder.py /tmp/fm2k --images 2000            # 200 per class
    python benchmarks/make_folder.py /tmp/fm10k --images 10000 --seed 1

Images are drawn evenly over the 10 classes of the training split with a seeded generator and
saved as PNG files under ``OUT/<class name>/``, so that ``dinolab train data.source=folder
data.root=OUT`` sees what a user's folder looks like (its k-NN monitor holds out 10% of them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dinolab.config import load_config
from dinolab.data.datasets import build_sources


def write_folder(out: Path, num_images: int, seed: int = 0, root: str = "") -> int:
    """``num_images`` // 10 images of each class of Fashion-MNIST's training split (found in
    ``root`` or where dinolab finds it), drawn with a seeded generator, as OUT/class_<label>/
    <index>.png -> the number of images written."""
    config = load_config(None, [f"data.root={root}"] if root else ["data.download=true"])
    images = build_sources(config.data).knn_train
    assert images is not None
    labels = torch.tensor([images[i][1] for i in range(len(images))])  # type: ignore[arg-type]
    classes = sorted(set(labels.tolist()))
    per_class = num_images // len(classes)
    generator = torch.Generator().manual_seed(seed)
    for label in classes:
        rows = torch.nonzero(labels == label).flatten()
        chosen = rows[torch.randperm(len(rows), generator=generator)[:per_class]]
        folder = out / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in chosen.tolist():
            images[index][0].save(folder / f"{index:05d}.png")
    return per_class * len(classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    written = write_folder(arguments.out, arguments.images, arguments.seed)
    print(f"{written} images in 10 class folders under {arguments.out}")


if __name__ == "__main__":
    main()
