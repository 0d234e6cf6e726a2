"""train(config, dataset=...): any Dataset of PIL images or (PIL image, label) pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import global_torch_state_kept, tiny_overrides
from PIL import Image
from torch.utils.data import Dataset

from dinolab.config import load_config
from dinolab.training.loop import train


class Quadrants(Dataset):
    """64 images of 28 px: a bright square in one of 4 quadrants (the label), and noise."""

    def __init__(self, labelled: bool) -> None:
        self.labelled = labelled

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> Image.Image | tuple[Image.Image, int]:
        rng = np.random.default_rng(index)
        label = index % 4
        pixels = rng.integers(0, 60, (28, 28))
        top, left = (label // 2) * 14, (label % 2) * 14
        pixels[top + 2: top + 12, left + 2: left + 12] += 180
        image = Image.fromarray(pixels.astype(np.uint8), mode="L")
        return (image, label) if self.labelled else image


@pytest.mark.parametrize("labelled", [True, False])
def test_a_labelled_dataset_feeds_the_knn_monitor(tmp_path: Path, labelled: bool) -> None:
    overrides = tiny_overrides(tmp_path / "unused", tmp_path / "run")
    with global_torch_state_kept():
        result = train(load_config(None, [*overrides, "train.epochs=1"]),
                       dataset=Quadrants(labelled))
    assert result.epochs_done == 1
    if labelled:  # a fixed 10% held out: 6 test images, so top-1 is a multiple of 1/6
        for accuracy in (result.knn_start, result.knn_end):
            assert accuracy is not None
            assert accuracy * 6 / 100 == pytest.approx(round(accuracy * 6 / 100))
    else:
        assert result.knn_start is None and result.knn_end is None


def test_a_dataset_of_tensors_is_refused_with_the_way_out(tmp_path: Path) -> None:
    """A Dataset that already applies ToTensor: one clear error before anything is written,
    not an AttributeError from deep inside the loader."""
    import torch

    from dinolab.config import ConfigError

    class Tensors(Dataset):
        def __len__(self) -> int:
            return 64

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            return torch.rand(3, 28, 28), 0

    run_dir = tmp_path / "run"
    config = load_config(None, tiny_overrides(tmp_path, run_dir))
    with pytest.raises(ConfigError, match="item 0 holds a torch.Tensor, not a PIL image: .* "
                                          "return the image before any ToTensor"):
        train(config, dataset=Tensors())
    assert not run_dir.exists()
