"""``dinolab export --hub DIR``: a folder in the Hugging Face Hub's timm layout, and ``--push``.

``timm.create_model("local-dir:DIR", pretrained=True)`` (or ``"hf-hub:USER/NAME"`` once
pushed) reads three files: ``config.json`` (``architecture``, the ``model_args`` dinolab gave
``timm.create_model``, ``num_classes`` 0, and a ``pretrained_cfg`` with the run's input size,
mean, std and evaluation crop, which ``timm.data.resolve_data_config`` turns into the run's
evaluation transform), ``model.safetensors`` (the backbone under timm's key names) and
``README.md``, the model card: the objective, the data, the number of images seen, the command
and resolved configuration that trained it, and the k-NN and linear figures the run folder
holds (``evaluation.json`` from ``dinolab knn|linear``, the k-NN monitor in ``metrics.jsonl``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from dinolab import __version__
from dinolab.config import Config, ConfigError, to_yaml
from dinolab.evaluation.export import save_weights
from dinolab.evaluation.loading import BackboneInfo
from dinolab.evaluation.results import read_results
from dinolab.models.backbone import feature_dim
from dinolab.models.weights import json_ready
from dinolab.training.checkpoint import LATEST, atomic_write
from dinolab.training.monitor import last_knn

NOT_MEASURED = "not measured"


def hub_destination(out: str | Path) -> Path:
    """``--hub`` checked before any work: a folder, new or existing."""
    destination = Path(out).expanduser()
    if destination.exists() and not destination.is_dir():
        raise ConfigError(f"--hub {out}: a file is in the way (the Hub format is a folder)")
    return destination


def write_hub_folder(backbone: nn.Module, info: BackboneInfo, destination: Path,
                     repo_id: str | None = None) -> Path:
    """config.json, model.safetensors and README.md in ``destination`` -> ``destination``.
    ``repo_id``: the Hub repository the card's example loads from (else the folder)."""
    if info.config is None:
        raise ConfigError(f"--hub: {info.file} is an export, which holds no data configuration "
                          "(input size, mean, std) or training record for the model card; "
                          "export from the run folder or a checkpoint")
    destination.mkdir(parents=True, exist_ok=True)
    save_weights(backbone, destination / "model.safetensors")
    config_text = json.dumps(hub_config(info, info.config), indent=2) + "\n"
    atomic_write(destination / "config.json", lambda temporary: temporary.write_text(config_text))
    name = f"hf-hub:{repo_id}" if repo_id else f"local-dir:{destination.resolve()}"
    card = model_card(info, info.config, name, feature_dim(backbone))
    atomic_write(destination / "README.md", lambda temporary: temporary.write_text(card))
    return destination


def hub_config(info: BackboneInfo, config: Config) -> dict[str, Any]:
    """timm's config.json: rebuild arguments, and the data config of the run's evaluation."""
    data = config.data
    channels = info.model_kwargs.get("in_chans", 3)
    return {
        "architecture": info.model_name,
        "num_classes": 0,
        "model_args": json_ready(info.model_kwargs),
        "pretrained_cfg": {
            "input_size": [channels, data.global_crop_size, data.global_crop_size],
            "mean": list(data.mean), "std": list(data.std),
            # dinolab evaluates at a resize to size * ratio, then a center crop (EvalTransform)
            "crop_pct": 1 / data.eval_resize_ratio, "crop_mode": "center",
            "interpolation": "bicubic", "num_classes": 0,
        },
    }


def recorded_figures(info: BackboneInfo, config: Config) -> dict[str, str]:
    """What the run folder measured of these weights, or "not measured". Only a run folder's
    latest checkpoint has figures: ``evaluation.json`` and the monitor describe that one."""
    folder = info.file.parent
    latest = info.file.name == LATEST
    results = read_results(folder) if latest else {}
    knn = [(int(key.removeprefix("knn_top1_k")), value) for key, value in results.items()
           if key.startswith("knn_top1_k")]
    monitor = last_knn(folder / "metrics.jsonl") if latest else None
    linear = results.get("linear_top1")
    return {
        "k-NN top-1, full splits (`dinolab knn`)":
            ", ".join(f"k={k}: {value:.1f}%" for k, value in sorted(knn)) or NOT_MEASURED,
        "linear probe top-1 (`dinolab linear`)":
            NOT_MEASURED if linear is None else f"{linear:.1f}%",
        f"k-NN top-1 monitor, last value in `metrics.jsonl` (k={config.eval.knn_k})":
            NOT_MEASURED if monitor is None else f"{monitor:.1f}%",
    }


def model_card(info: BackboneInfo, config: Config, name: str, width: int) -> str:
    """README.md: Hub metadata, then what was trained, how to load it, its figures, its recipe.
    The figures are the teacher's on the run's own data (``record_result`` keeps no others)."""
    data, train = config.data, config.train
    step = info.step or 0
    seen = f"{step * int(train.batch_size):,} images seen ({step:,} steps of {train.batch_size})"
    split = f", split {data.split}" if data.split else ""
    figures = "\n".join(f"| {what} | {value} |"
                        for what, value in recorded_figures(info, config).items())
    return f"""---
library_name: timm
tags:
- image-feature-extraction
- self-supervised
- dinolab
---

# {info.model_name}, {config.method}

The {info.weights}'s backbone of a self-supervised run of dinolab {__version__}: objective
`method={config.method}`, data `{data.source}` at `{data.root or "(its default place)"}`{split},
{data.global_crop_size} px crops, {seen}. The model returns one feature vector per image
(the final-normed [CLS] token of a ViT, the pooled feature of a CNN): no classifier.

```python
import timm
model = timm.create_model("{name}", pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))
features = model(transform(image.convert("RGB")).unsqueeze(0))  # [1, {width}]
```

## Figures the run folder holds

The teacher's, on the run's own data.

| evaluation | result |
|---|---|
{figures}

## How it was trained

`dinolab train config.yaml`, where `config.yaml` (saved in the run folder and in every
checkpoint) holds the resolved configuration:

```yaml
{to_yaml(config).rstrip()}
```
"""


def push_folder(folder: Path, repo_id: str) -> str:
    """Upload ``folder`` to the Hub model repository ``repo_id`` (created if needed) -> its
    URL. Any failure (no network, no token, no permission) is one line; the folder stays."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        repo = api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo.repo_id,
                          commit_message=f"dinolab {__version__} export")
    except Exception as error:  # httpx's network errors and the Hub's HTTP errors share no base
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"--push {repo_id}: the upload failed ({reason}); {folder} is "
                          f"written: `hf upload {repo_id} {folder}` pushes it later") from None
    return str(repo)
