"""Pre-train on your own torch Dataset from Python.

Any Dataset whose items are a PIL image, or (PIL image, label), can replace data.source. Here a
small synthetic data set of coloured shapes stands in for yours. Labels (the shape) are never
used by training; because the items carry them, the k-NN monitor compares a fixed 10% of the
images with the rest at the start and the end.

    python examples/custom_dataset.py [key=value ...]
"""

from __future__ import annotations

import sys

import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from dinolab.config import load_config
from dinolab.training.loop import train


class Shapes(Dataset):
    """Circles, squares and triangles of random colour, size and place on 64 px images."""

    def __init__(self, size: int = 512, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.params = torch.rand(size, 7, generator=generator).tolist()

    def __len__(self) -> int:
        return len(self.params)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        kind_draw, red, green, blue, x, y, scale = self.params[index]
        kind = int(kind_draw * 3)
        image = Image.new("RGB", (64, 64), (20, 20, 20))
        draw = ImageDraw.Draw(image)
        radius = 8 + 14 * scale
        cx, cy = 16 + 32 * x, 16 + 32 * y
        colour = (int(80 + 175 * red), int(80 + 175 * green), int(80 + 175 * blue))
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        else:
            corners = [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)]
            draw.polygon(corners, fill=colour)
        return image, kind


def main(overrides: list[str]) -> None:
    config = load_config("demo", [
        "data.global_crop_size=32", "data.local_crop_size=16", "data.num_local_crops=2",
        "model.patch_size=8",
        "data.mean=[0.485,0.456,0.406]", "data.std=[0.229,0.224,0.225]",
        "train.epochs=2", "train.batch_size=64", "run.dir=runs/shapes", *overrides,
    ])
    result = train(config, dataset=Shapes())
    print(f"teacher backbone: {result.run_dir / 'teacher.safetensors'}")


if __name__ == "__main__":
    main(sys.argv[1:])
