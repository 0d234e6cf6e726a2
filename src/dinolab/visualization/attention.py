"""Self-attention maps of the last block (Caron et al., 2021, Fig. 1 and Sec. 4.2.1).

DINO's [CLS] token, in the last block, attends to the object: for each head, the attention
probabilities from [CLS] (token 0) to the patch tokens, on the patch grid, make a segmentation
map that no label taught. A mask that keeps the largest patches until they hold ``threshold``
(60% in the paper) of the head's attention mass shows where the head looks.

timm computes attention with fused scaled-dot-product kernels, which never materialise the
probabilities. So the forward runs unchanged and a pre-hook keeps the last block's attention
input (the block's normalised tokens); from it the probabilities of the [CLS] row alone are
recomputed with the module's own ``qkv`` projection, ``q_norm``/``k_norm`` and scale. Prefix
tokens (the [CLS] token and any register tokens, ``num_prefix_tokens`` of them) are dropped
after the softmax, so a map over patches sums to 1 minus the mass on prefix tokens.

Shapes: B images, H heads, N tokens (prefix + patches), h x w patch grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from timm.layers import Attention
from torch import nn

from dinolab.config import Config, ConfigError
from dinolab.visualization import images as inputs
from dinolab.visualization.rendering import colorize, grid, overlay, save_png, upsample

DEFAULT_THRESHOLD = 0.6  # the paper's masks keep 60% of the attention mass


def check_attention_backbone(backbone: nn.Module) -> None:
    """Refuse, in one line, a backbone without a [CLS] token and timm's standard attention."""
    blocks = getattr(backbone, "blocks", None)
    has_cls = getattr(backbone, "cls_token", None) is not None
    standard = blocks is not None and len(blocks) > 0 and isinstance(
        getattr(blocks[-1], "attn", None), Attention)
    if not (has_cls and standard and hasattr(backbone, "patch_embed")):
        raise ConfigError(
            "attention maps need a ViT with a [CLS] token and timm's standard attention; "
            f"{type(backbone).__name__} is not one (dinolab features works for any backbone)"
        )


@torch.no_grad()
def cls_attention_over_tokens(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """images [B, 3, S_h, S_w] -> the last block's [CLS] attention [B, H, N] (rows sum to 1)."""
    check_attention_backbone(backbone)
    attention: Attention = backbone.blocks[-1].attn  # type: ignore[index, union-attr]
    kept: list[torch.Tensor] = []
    hook = attention.register_forward_pre_hook(lambda module, args: kept.append(args[0]))
    try:
        backbone.forward_features(images)  # type: ignore[operator]
    finally:
        hook.remove()
    tokens = kept[-1]  # [B, N, D]: what the attention module received
    batch, count, _ = tokens.shape
    qkv = attention.qkv(tokens).reshape(batch, count, 3, attention.num_heads, attention.head_dim)
    # The norms in the model's own dtype, the product and softmax in float32.
    query = attention.q_norm(qkv[:, :1, 0].transpose(1, 2)).float()  # [B, H, 1, d]: [CLS]
    keys = attention.k_norm(qkv[:, :, 1].transpose(1, 2)).float()  # [B, H, N, d]
    logits = (query * attention.scale) @ keys.transpose(-2, -1)  # [B, H, 1, N]
    return logits.softmax(dim=-1).squeeze(2)


def cls_attention(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """images [B, 3, S_h, S_w] -> [CLS]->patch attention on the grid [B, H, h, w]."""
    rows = cls_attention_over_tokens(backbone, images)
    grid_h, grid_w = backbone.patch_embed.dynamic_feat_size(images.shape[-2:])  # type: ignore[union-attr, operator]
    patches = rows[..., int(backbone.num_prefix_tokens):]  # type: ignore[arg-type]
    return patches.reshape(*rows.shape[:2], grid_h, grid_w)


def mass_mask(maps: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """maps [..., h, w] -> bool [..., h, w]: the fewest patches holding ``threshold`` of the mass.

    Patches are taken largest first until their share of the map's total reaches the threshold,
    so the kept share is >= threshold and dropping the smallest kept patch falls below it.
    """
    if not 0 < threshold <= 1:
        raise ConfigError(f"--threshold must be in (0, 1], not {threshold}")
    flat = maps.flatten(-2).float()
    shares = flat / flat.sum(dim=-1, keepdim=True)
    sorted_shares, order = shares.sort(dim=-1, descending=True)
    before = sorted_shares.cumsum(dim=-1) - sorted_shares  # the mass kept before each patch
    keep_sorted = before < threshold
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.reshape(maps.shape)


def map_pictures(picture: np.ndarray, maps: torch.Tensor, threshold: float,
                 ) -> dict[str, np.ndarray]:
    """picture [S_h, S_w, 3], maps [H, h, w] -> named heat maps and masked overlays, per head
    and for the mean over heads, all at the picture's size."""
    height, width = picture.shape[:2]
    named = {"mean": maps.mean(dim=0), **{f"head{index}": head for index, head in enumerate(maps)}}
    pictures = {}
    for name, attention_map in named.items():
        heat = colorize(upsample(attention_map, height, width))
        mask = upsample(mass_mask(attention_map, threshold), height, width).bool().numpy()
        pictures[f"attention_{name}"] = heat
        pictures[f"attention_{name}_overlay"] = overlay(picture, heat, mask)
    return pictures


def summary_row(picture: np.ndarray, pictures: dict[str, np.ndarray]) -> list[np.ndarray]:
    """One row of the grid: the input, the mean heat map and overlay, then each head's map."""
    heads = [value for key, value in pictures.items()
             if key.startswith("attention_head") and not key.endswith("_overlay")]
    return [picture, pictures["attention_mean"], pictures["attention_mean_overlay"], *heads]


def write_attention_maps(backbone: nn.Module, config: Config | None, paths: Sequence[str | Path],
                         out_dir: Path, threshold: float = DEFAULT_THRESHOLD,
                         size: int | None = None) -> list[Path]:
    """The ``dinolab attention`` command: per image NAME_attention_{mean,headI}[_overlay].png,
    and attention_grid.png with one row per image. -> the files written."""
    check_attention_backbone(backbone)
    mass_mask(torch.ones(1, 1), threshold)  # a bad threshold fails before any work
    transform = inputs.input_transform(backbone, config, size)
    batch = inputs.prepare(inputs.read_images(paths), transform)
    maps = cls_attention(backbone.eval(), batch)
    written, rows = [], []
    for name, image, image_maps in zip(inputs.output_names(paths), batch, maps, strict=True):
        picture = inputs.to_picture(image, transform)
        pictures = map_pictures(picture, image_maps, threshold)
        written += [save_png(value, out_dir / f"{name}_{key}.png")
                    for key, value in pictures.items()]
        rows.append(summary_row(picture, pictures))
    written.append(save_png(grid(rows), out_dir / "attention_grid.png"))
    return written
