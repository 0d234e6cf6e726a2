"""The examples in examples/ run as documented (at a tiny size)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.slow
def test_custom_dataset_example_trains_and_exports(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("custom_dataset", EXAMPLES / "custom_dataset.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    dataset = example.Shapes(size=40)
    image, label = dataset[0]
    assert image.size == (64, 64) and label in (0, 1, 2)
    example.Shapes = lambda: dataset  # keep the run tiny
    example.main([
        f"run.dir={tmp_path / 'run'}", "train.epochs=1", "train.batch_size=16",
        "train.precision=fp32", "data.num_workers=0", "model.backbone_kwargs={depth: 1}",
        "run.progress_bar=false", "run.tensorboard=false",
    ])
    assert (tmp_path / "run" / "teacher.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
