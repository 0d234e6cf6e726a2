"""``dinolab export --onnx FILE.onnx``: the backbone as an ONNX graph for deployment.

One input, ``images`` [B, 3, S, S] (normalised as the run's evaluation transform does, S the
run's global crop size), one output, ``features`` [B, D]; the batch axis B is dynamic. Written
by torch's ``torch.export``-based exporter (``dynamo=True``, which needs onnxscript): the
TorchScript exporter also traces timm's ViTs and CNNs on the CPU, but torch deprecates it and
warns on every ViT trace. The weights sit inside the file up to protobuf's 2 GB (a ViT-L's
1.2 GB), beyond in ``FILE.onnx.data`` next to it. Needs the ``onnx`` extra: ``pip install
'dinolab[onnx]'``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from dinolab.config import ConfigError
from dinolab.evaluation.inputs import default_config
from dinolab.evaluation.loading import BackboneInfo

EXPORTER_PACKAGES = ("onnx", "onnxscript")  # what torch.onnx.export(dynamo=True) imports
INPUT_NAME, OUTPUT_NAME = "images", "features"


def onnx_destination(out: str | Path) -> Path:
    """``--onnx`` checked before any work: the file's suffix and the exporter's packages."""
    destination = Path(out).expanduser()
    if destination.suffix != ".onnx":
        raise ConfigError(f"--onnx {out}: an ONNX export is a .onnx file")
    missing = []
    for name in EXPORTER_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(f"--onnx needs {' and '.join(missing)}: pip install 'dinolab[onnx]'")
    return destination


def export_onnx(backbone: nn.Module, info: BackboneInfo, destination: Path) -> list[int]:
    """Write ``destination`` (from ``onnx_destination``) -> the input shape [C, S, S] it takes
    (after the batch axis)."""
    size = (info.config or default_config(info)).data.global_crop_size
    channels = info.model_kwargs.get("in_chans", 3)
    # Batch 2, not 1: torch.export fixes a dimension whose example size is 1.
    example = torch.zeros(2, channels, size, size)
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(backbone, (example,), input_names=[INPUT_NAME],
                                output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
                                dynamo=True, verbose=False)
    assert program is not None  # the dynamo exporter returns the program it built
    destination.parent.mkdir(parents=True, exist_ok=True)
    # Not through a temporary file: a graph over 2 GB names its weights file after the file it
    # is saved as.
    program.save(destination)
    return [channels, size, size]
