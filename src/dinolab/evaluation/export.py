"""``dinolab export --out``: the backbone alone, as timm loads it.

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

The other forms of ``dinolab export`` build on the same weights: a Hugging Face Hub folder
(``hub.py``) and an ONNX graph (``onnx_export.py``).
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from dinolab.config import ConfigError
from dinolab.evaluation.loading import BackboneInfo
from dinolab.models.weights import sidecar_path, sidecar_text
from dinolab.training.checkpoint import atomic_write


def safetensors_destination(out: str | Path) -> Path:
    """``--out`` checked before any work: an export is a .safetensors file."""
    destination = Path(out).expanduser()
    if destination.suffix != ".safetensors":
        raise ConfigError(f"--out {out}: an export is a .safetensors file")
    return destination


def save_weights(backbone: nn.Module, destination: Path) -> None:
    """The backbone's state dict under timm's key names, written atomically."""
    tensors = {key: value.detach().contiguous() for key, value in backbone.state_dict().items()}
    destination.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(destination, lambda temporary: save_file(tensors, str(temporary)))


def export_backbone(backbone: nn.Module, info: BackboneInfo, destination: Path) -> Path:
    """Write ``destination`` (from ``safetensors_destination``) and its sidecar -> the sidecar."""
    if destination.resolve() == info.file.resolve():
        raise ConfigError(f"--out {destination}: the export would overwrite its source")
    save_weights(backbone, destination)
    description = sidecar_text(info.model_name, info.model_kwargs)
    sidecar = sidecar_path(destination)
    atomic_write(sidecar, lambda temporary: temporary.write_text(description))
    return sidecar
