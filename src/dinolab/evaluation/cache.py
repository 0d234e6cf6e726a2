"""Features are extracted once and cached next to the weights they came from.

Extraction is the expensive part of every evaluation (a backbone forward per image); k-NN, the
linear probe and the embeddings read the same features. The cache lives in a ``features/``
folder beside the checkpoint or export (in a run folder: ``RUN/features/``). A file's name is a
digest of everything the features depend on: the weights file (path, size, modification time,
training step), teacher or student, which features (the backbone's output or the blocks of the
linear probe), the split, the data (source, root, number of images) and the evaluation
transform (crop, resize ratio, mean, std) and precision. A checkpoint rewritten by further
training gets new files; old ones are never read again (delete the folder to reclaim space).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dinolab.config import DataConfig
from dinolab.evaluation.loading import BackboneInfo
from dinolab.training.checkpoint import atomic_write

CACHE_FOLDER = "features"


def cache_key(info: BackboneInfo, data: DataConfig, split: str, kind: str,
              autocast_dtype: torch.dtype | None, num_images: int) -> dict[str, Any]:
    """Everything the features depend on, as plain JSON values."""
    status = info.file.stat()
    return {
        "weights_file": str(info.file.resolve()), "weights_size": status.st_size,
        "weights_mtime_ns": status.st_mtime_ns, "step": info.step, "weights": info.weights,
        "kind": kind, "split": split, "source": data.source,
        "root": str(Path(data.root).resolve()) if data.root else "",
        "num_images": num_images, "crop": data.global_crop_size,
        "resize_ratio": data.eval_resize_ratio, "mean": list(data.mean), "std": list(data.std),
        "precision": str(autocast_dtype or torch.float32),
    }


def cache_path(info: BackboneInfo, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return info.file.parent / CACHE_FOLDER / f"{key['split']}-{key['kind']}-{digest}.pt"


def cached_features(info: BackboneInfo, key: dict[str, Any],
                    extract: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D], labels [N]) from the cache, or from ``extract`` and then cached."""
    path = cache_path(info, key)
    description = f"{key['split']} features ({key['num_images']} images, {key['kind']})"
    if path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("key") == key:
            print(f"{description}: from the cache {path}")
            return stored["features"], stored["labels"]
    started = time.perf_counter()
    features, labels = extract()
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {"key": key, "features": features, "labels": labels}
    atomic_write(path, lambda temporary: torch.save(content, temporary))
    print(f"{description}: extracted in {time.perf_counter() - started:.1f} s, cached in {path}")
    return features, labels
