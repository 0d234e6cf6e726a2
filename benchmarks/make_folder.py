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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    images = build_sources(load_config(None, ["data.download=true"]).data).knn_train
    assert images is not None
    labels = torch.tensor([images[i][1] for i in range(len(images))])  # type: ignore[arg-type]
    classes = sorted(set(labels.tolist()))
    per_class = arguments.images // len(classes)
    generator = torch.Generator().manual_seed(arguments.seed)
    for label in classes:
        rows = torch.nonzero(labels == label).flatten()
        chosen = rows[torch.randperm(len(rows), generator=generator)[:per_class]]
        folder = arguments.out / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in chosen.tolist():
            images[index][0].save(folder / f"{index:05d}.png")
    print(f"{per_class * len(classes)} images in {len(classes)} class folders "
          f"under {arguments.out}")


if __name__ == "__main__":
    main()
