"""The training data pipeline as the loop drives it: resumable mid-epoch, any number of local
crops.

The end-to-end resume of a whole run (checkpoint, signal) is tested with the loop; here the
data side alone: a pipeline rebuilt from scratch and set to (epoch, samples consumed) delivers
exactly the rest of the epoch, view for view.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_fashion_mnist, tiny_overrides

from dinolab.config import Config, load_config
from dinolab.data.datasets import build_sources
from dinolab.training.loop import train
from dinolab.training.pipeline import build_training_data

CPU = torch.device("cpu")
BATCH = 8


def _config(tmp_path: Path, *extra: str) -> Config:
    return load_config(None, [*tiny_overrides(tmp_path / "fashion", tmp_path / "run"),
                              f"train.batch_size={BATCH}", *extra])


def _epoch_views(config: Config, epoch: int, start: int, stop: int | None,
                 ) -> list[list[torch.Tensor]]:
    """A fresh pipeline (as in a new process) set to ``start`` samples into ``epoch`` -> the
    views of its batches until ``stop`` batches of the epoch are done (None: the end)."""
    images = build_sources(config.data).train
    data = build_training_data(config, images, CPU)
    data.sampler.set_position(epoch, start)
    done = start // BATCH
    count = (data.sampler.batches_per_epoch if stop is None else stop) - done
    return list(data.epoch_views(CPU, epoch, done, count))


@pytest.mark.parametrize(("augmentation", "workers", "prefetch"), [
    ("pil", 0, False), ("pil", 2, False), ("batched", 0, False), ("batched", 2, False),
    ("batched", 2, True)])
def test_a_resumed_epoch_continues_without_replay_or_skip(tmp_path: Path, augmentation: str,
                                                          workers: int, prefetch: bool) -> None:
    make_fashion_mnist(tmp_path / "fashion", num_train=44, num_test=8)  # 5 batches, 4 left out
    config = _config(tmp_path, f"data.augmentation={augmentation}",
                     f"data.num_workers={workers}", f"data.prefetch_views={prefetch}")
    uninterrupted = _epoch_views(config, epoch=1, start=0, stop=None)
    before_stop = _epoch_views(config, epoch=1, start=0, stop=2)
    after_resume = _epoch_views(config, epoch=1, start=2 * BATCH, stop=None)
    assert len(uninterrupted) == 5 and len(before_stop) == 2 and len(after_resume) == 3
    for whole, pieced in zip(uninterrupted, before_stop + after_resume, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(whole, pieced, strict=True))
    other_epoch = _epoch_views(config, epoch=2, start=0, stop=1)
    assert not torch.equal(other_epoch[0][0], uninterrupted[0][0])


def test_prefetch_makes_the_next_views_before_handing_over_the_current_ones(
        tmp_path: Path) -> None:
    """data.prefetch_views: micro-batch i+1's views are made (on CUDA: launched on a side
    stream) before micro-batch i goes to its step; the views themselves are unchanged, and no
    micro-batch past ``count`` is read or counted by the skip log."""
    make_fashion_mnist(tmp_path / "fashion", num_train=44, num_test=8)
    config = _config(tmp_path, "data.augmentation=batched", "data.num_workers=0")
    plain = _epoch_views(config, epoch=0, start=0, stop=4)
    data = build_training_data(load_config(None, [*tiny_overrides(
        tmp_path / "fashion", tmp_path / "run"), f"train.batch_size={BATCH}",
        "data.augmentation=batched", "data.num_workers=0", "data.prefetch_views=true"]),
        build_sources(config.data).train, CPU)
    made = []
    views_of = data.views
    data.views = lambda *arguments: made.append(arguments[3]) or views_of(*arguments)
    data.sampler.set_position(0, 0)
    handed_over = []
    for views in data.epoch_views(CPU, 0, 0, 4):
        handed_over.append(views)
        assert made == list(range(min(len(handed_over) + 1, 4)))
    assert len(handed_over) == 4 and data.skips.read == 4 * BATCH
    for ours, theirs in zip(plain, handed_over, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_the_sampler_shard_of_a_resumed_epoch_is_the_rest_of_the_epoch(tmp_path: Path) -> None:
    """The image indices themselves: consumed + resumed = the uninterrupted epoch, each once."""
    make_fashion_mnist(tmp_path / "fashion", num_train=44, num_test=8)
    config = _config(tmp_path)
    data = build_training_data(config, build_sources(config.data).train, CPU)
    data.sampler.set_position(3)
    whole = [index for index, _ in data.sampler]
    data.sampler.set_position(3, 3 * BATCH)
    rest = [index for index, _ in data.sampler]
    assert whole[3 * BATCH:] == rest and len(set(whole)) == len(whole) == 40


def test_training_without_local_crops(tmp_path: Path) -> None:
    """data.num_local_crops=0: two global views trained end to end (the loss's two pairs, each
    global view against the other, are checked against lightly in test_loss.py)."""
    make_fashion_mnist(tmp_path / "fashion", num_train=32, num_test=8)
    config = _config(tmp_path, "data.num_local_crops=0", "train.epochs=1")
    data = build_training_data(config, build_sources(config.data).train, CPU)
    data.sampler.set_position(0)
    views = data.views(next(iter(data.loader)), CPU, 0, 0)
    assert [tuple(view.shape) for view in views] == [(BATCH, 3, 28, 28)] * 2
    result = train(config)
    assert result.epochs_done == 1
    losses = [line for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
              if '"kind": "epoch"' in line]
    assert len(losses) == 1 and "NaN" not in losses[0]


def test_auto_augmentation_is_batched_on_gpus_and_pil_elsewhere() -> None:
    from dinolab.training.pipeline import resolve_augmentation

    assert resolve_augmentation("auto", torch.device("cuda", 0)) == "batched"
    assert resolve_augmentation("auto", torch.device("cpu")) == "pil"
    assert resolve_augmentation("pil", torch.device("cuda", 0)) == "pil"
    assert resolve_augmentation("batched", torch.device("cpu")) == "batched"
