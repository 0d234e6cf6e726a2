"""Backbone weight files in and out: the layouts dinolab reads, and the sidecar it writes.

Read (``model.weights``, ``dinolab.load_backbone``): timm weights (safetensors or a torch state
dict), dinolab's own checkpoints and exports, and the checkpoints of the authors' DINO
repository: a full training checkpoint (``student``/``teacher`` state dicts whose keys carry
``module.`` and ``backbone.`` prefixes, next to the head's ``head.*`` keys) or a backbone-only
file such as ``dino_deitsmall16_pretrain.pth``. The authors' ViT names its parameters as timm's
VisionTransformer does (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.*``,
``norm``), so mapping a layout to timm's is a matter of picking the backbone and stripping
prefixes. The teacher is preferred: it is the network the paper evaluates and releases.

Written (exports): the backbone under timm's key names as safetensors, with a JSON sidecar
``FILE.json`` holding ``model_name`` and ``model_kwargs`` so that ``timm.create_model`` can
rebuild the architecture without dinolab.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinolab.config import ConfigError

TRAINING_CHECKPOINT_KEYS = ("teacher", "student")  # dinolab's and the authors' full checkpoints
WRAPPER_KEYS = ("state_dict", "model")  # other training scripts' checkpoints
PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


def refused_code(error: Exception) -> str | None:
    """The global a weights-only ``torch.load`` refused to import, or None for other failures.

    torch's restricted unpickler raises UnpicklingError("Weights only load failed ...") for a
    pickle that imports a global outside its allow-list (``os.system`` in a crafted file): such a
    file was made to run code. Other refusals (an opcode it does not run) mean a damaged file or
    one that torch did not write.
    """
    text = str(error)
    if not isinstance(error, pickle.UnpicklingError) or "Weights only load failed" not in text:
        return None
    named = re.search(r"unsupported GLOBAL ([\w.]+)|Unsupported global: GLOBAL ([\w.]+)", text)
    if named is None:
        return None
    return next(group for group in named.groups() if group)


def load_error_reason(error: Exception) -> str:
    """One line on why a weights file did not load (safetensors, pickle and zip errors have
    no common base class)."""
    refused = refused_code(error)
    if refused:
        return (f"it holds a pickle that would import {refused}; refused: only tensors and "
                "plain containers are loaded")
    text = str(error)
    if "PytorchStreamReader" in text:
        return "truncated or corrupt: its zip archive is incomplete"
    if "Weights only load failed" in text:
        operand = re.search(r"Unsupported operand \d+", text)
        detail = f": {operand.group(0)}" if operand else ""
        return f"not a file torch.save wrote, or damaged (its pickle does not load{detail})"
    first_line = text.splitlines()[0][:100] if text.strip() else "no detail"
    return f"not a checkpoint, or truncated: {type(error).__name__}: {first_line}"


def read_state_dict(path: Path, what: str) -> dict[str, Any]:
    """The top-level mapping of a safetensors or torch file (loaded weights-only: a pickle that
    would run code is refused). Errors name ``what`` (a config key or a command argument)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors, pickle and zip errors have no common base
        raise ConfigError(f"{what}: {path} is not a weights file "
                          f"({load_error_reason(error)})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{what}: {path} holds no state dict")
    return state


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix):] if key.startswith(prefix) else key


def backbone_state(state: dict[str, Any], weights: str = "teacher") -> dict[str, torch.Tensor]:
    """The backbone's tensors under timm's names, from any layout the module docstring lists.

    ``weights`` picks the network of a full training checkpoint (``teacher`` or ``student``;
    the other one is the fallback when a file holds only one).
    """
    preference = (weights, *[name for name in TRAINING_CHECKPOINT_KEYS if name != weights])
    for name in (*preference, *WRAPPER_KEYS):
        if isinstance(state.get(name), dict):
            state = state[name]
            break
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    for prefix in PREFIXES:
        tensors = {_strip(key, prefix): value for key, value in tensors.items()}
    if any(key.startswith("backbone.") for key in tensors):  # backbone + head: the head goes
        tensors = {key[len("backbone."):]: value for key, value in tensors.items()
                   if key.startswith("backbone.")}
    return tensors


def without_classifier(model: nn.Module, tensors: dict[str, torch.Tensor],
                       ) -> dict[str, torch.Tensor]:
    """Drop the classifier of weights trained with one (timm's ImageNet weights) when the model
    has none: dinolab's backbones are built with ``num_classes=0``."""
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
    names = [classifier] if isinstance(classifier, str) else list(classifier or [])
    own = model.state_dict()
    return {key: value for key, value in tensors.items()
            if key in own or not any(key.startswith(f"{name}.") for name in names)}


def load_backbone_state(model: nn.Module, tensors: dict[str, torch.Tensor], what: str,
                        path: Path) -> None:
    """Load strictly; a missing or extra key, or a shape that differs, is one ConfigError."""
    tensors = without_classifier(model, tensors)
    own = model.state_dict()
    missing = [key for key in own if key not in tensors]
    unexpected = [key for key in tensors if key not in own]
    wrong_shape = [key for key in tensors
                   if key in own and tuple(tensors[key].shape) != tuple(own[key].shape)]
    if missing or unexpected or wrong_shape:
        example = (wrong_shape or missing or unexpected)[0]
        raise ConfigError(
            f"{what}: {path} does not fit {type(model).__name__} ({len(missing)} missing, "
            f"{len(unexpected)} unexpected keys, {len(wrong_shape)} of another shape; "
            f"e.g. {example})"
        )
    model.load_state_dict(tensors)


def json_ready(value: Any) -> Any:
    """Tuples (OmegaConf and timm use them) become lists, so the sidecar is plain JSON."""
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    return value


def sidecar_path(weights_file: Path) -> Path:
    """``FILE.safetensors`` -> ``FILE.json``."""
    return weights_file.with_suffix(".json")


def sidecar_text(model_name: str, model_kwargs: dict[str, Any]) -> str:
    """``model_kwargs`` leave out ``num_classes``: the caller passes it (0 for features)."""
    kwargs = {key: value for key, value in model_kwargs.items() if key != "num_classes"}
    return json.dumps({"model_name": model_name, "model_kwargs": json_ready(kwargs)},
                      indent=2) + "\n"


def read_sidecar(weights_file: Path) -> tuple[str, dict[str, Any]]:
    path = sidecar_path(weights_file)
    if not path.is_file():
        raise ConfigError(f"{weights_file}: no sidecar {path.name} next to it (model_name and "
                          "model_kwargs; `dinolab export` writes both)")
    try:
        description = json.loads(path.read_text())
        return str(description["model_name"]), dict(description.get("model_kwargs") or {})
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{path}: not a dinolab export sidecar ({error})") from None
