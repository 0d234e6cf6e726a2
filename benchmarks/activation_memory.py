"""What autograd keeps from the student's forward for its backward, with and without
``model.grad_checkpointing``: the activation memory of a DINO step, on any machine.

The student is built on PyTorch's meta device, so nothing is allocated and nothing computed: the
figures for ViT-B/16 at batch 64 come out on a laptop in seconds. Each tensor saved for the
backward is counted once per storage (views of one tensor share it), weights not, in the dtype
it has in a float32 forward; bf16 autocast keeps most of them at half the size. Parameters,
gradients, AdamW's state and the teacher (no backward) come on top, and the allocator's slack
on top of that.

  python benchmarks/activation_memory.py                       # ViT-S/16, 2x224 + 10x96, batch 64
  python benchmarks/activation_memory.py --backbone vit_base_patch16_224 --batch 32 64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from dinolab import auto
from dinolab.config import load_config
from dinolab.models.backbone import enable_grad_checkpointing
from dinolab.training.state import build_network

GIB = 2**30


def kept_for_backward(arguments: argparse.Namespace, backbone: str, batch: int,
                      checkpointing: bool) -> int:
    """Bytes of the distinct storages, other than its weights', that the student's forward
    saves for its backward."""
    config = load_config(arguments.preset, [f"model.backbone={backbone}",
                                            f"data.num_local_crops={arguments.local_crops}",
                                            *arguments.set])
    config = auto.resolve_for_preset(config, arguments.preset)
    with torch.device("meta"):
        student = build_network(config, config.model.drop_path_rate).train()
    if checkpointing:
        enable_grad_checkpointing(student.backbone, backbone)
    sizes = [arguments.global_crop] * 2 + [arguments.local_crop] * arguments.local_crops
    views = [torch.empty(batch, 3, size, size, device="meta") for size in sizes]
    weights = {parameter.untyped_storage()._cdata for parameter in student.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:  # a weight saved for the backward costs nothing more
            storages[storage._cdata] = storage.nbytes()  # saved storages live on: unique keys
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        student(views)
    return sum(storages.values())


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="imagenet_vit_small")
    parser.add_argument("--backbone", nargs="+", default=["vit_small_patch16_224"])
    parser.add_argument("--batch", type=int, nargs="+", default=[64], help="per process")
    parser.add_argument("--global-crop", type=int, default=224)
    parser.add_argument("--local-crop", type=int, default=96)
    parser.add_argument("--local-crops", type=int, default=10)
    parser.add_argument("--set", action="append", default=[], help="a config override")
    parser.add_argument("--json", help="also write the rows here")
    arguments = parser.parse_args(argv)
    rows = []
    print(f"2x{arguments.global_crop} + {arguments.local_crops}x{arguments.local_crop} crops, "
          "float32 forward; kept for the student's backward:")
    print(f"{'backbone':28} {'batch':>5} {'plain GiB':>10} {'checkpointed GiB':>17} {'ratio':>6}")
    for backbone in arguments.backbone:
        for batch in arguments.batch:
            plain, checkpointed = (kept_for_backward(arguments, backbone, batch, switch)
                                   for switch in (False, True))
            rows.append({"backbone": backbone, "batch": batch, "plain_bytes": plain,
                         "checkpointed_bytes": checkpointed})
            print(f"{backbone:28} {batch:5d} {plain / GIB:10.2f} {checkpointed / GIB:17.2f} "
                  f"{plain / checkpointed:6.1f}")
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
