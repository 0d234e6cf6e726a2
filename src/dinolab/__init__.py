"""dinolab: self-supervised pre-training of vision backbones with DINO (Caron et al., 2021)."""

__version__ = "0.1.0"
