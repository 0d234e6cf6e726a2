"""dinolab: self-supervised pre-training of vision backbones with DINO (Caron et al., 2021)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dinolab.evaluation.loading import load_backbone

__version__ = "0.1.0"
__all__ = ["load_backbone"]


def __getattr__(name: str) -> Any:
    """``dinolab.load_backbone`` imports torch and timm on first use, not at ``import dinolab``
    (the CLI's configuration errors stay instant)."""
    if name == "load_backbone":
        from dinolab.evaluation.loading import load_backbone

        return load_backbone
    raise AttributeError(f"module 'dinolab' has no attribute {name!r}")
