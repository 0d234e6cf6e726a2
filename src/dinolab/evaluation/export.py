"""``dinolab export``: the backbone alone, as timm loads it.

Writes ``FILE.safetensors`` (timm's key names, no head) and ``FILE.json`` with ``model_name``
and ``model_kwargs`` (the keywords dinolab gave ``timm.create_model``, drop path 0, without
``num_classes``), so that without dinolab::

    description = json.load(open("FILE.json"))
    model = timm.create_model(description["model_name"], pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file="FILE.safetensors",
                                                          custom_load=False),
                              **description["model_kwargs"])

rebuilds the network with the trained weights (timm's pretrained loading from a local file).
``custom_load=False``: some models' registered weights are JAX .npz files (the augreg ViTs),
and timm before 1.0.31 would read the local file with that .npz loader.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from dinolab.config import ConfigError
from dinolab.evaluation.loading import BackboneInfo, load_backbone
from dinolab.models.weights import sidecar_path, sidecar_text
from dinolab.training.checkpoint import atomic_write


def export_backbone(path: str | Path, out: str | Path,
                    weights: str = "teacher") -> tuple[Path, BackboneInfo]:
    """-> (the safetensors file written, what was exported). Its sidecar sits next to it."""
    destination = Path(out).expanduser()
    if destination.suffix != ".safetensors":
        raise ConfigError(f"--out {out}: an export is a .safetensors file")
    backbone, info = load_backbone(path, weights)
    if destination.resolve() == info.file.resolve():
        raise ConfigError(f"--out {out}: the export would overwrite its source")
    tensors = {key: value.detach().contiguous() for key, value in backbone.state_dict().items()}
    destination.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(destination, lambda temporary: save_file(tensors, str(temporary)))
    description = sidecar_text(info.model_name, info.model_kwargs)
    atomic_write(sidecar_path(destination), lambda temporary: temporary.write_text(description))
    return destination, info
