"""torchrun environment: process group set-up, rank queries and the collectives DINO needs.

Under ``torchrun`` the variables RANK, WORLD_SIZE and LOCAL_RANK are set and a process group is
created (NCCL on CUDA, gloo on CPU); multi-node runs use torchrun's rendezvous, and a group that
torchrun restarts meets under keys of its own (rendezvous.py). In a plain ``python`` process
every helper is a no-op.
"""

from __future__ import annotations

import gc
import os
import sys

import torch
import torch.distributed as dist

from dinolab.distributed.rendezvous import JOIN_TIMEOUT, generation_store


def init_distributed(device: torch.device) -> bool:
    """Create torchrun's process group -> whether this call created it.

    A group that already exists (a caller's ``dist.init_process_group``) is used as it is and
    stays its owner's to destroy; a plain ``python`` process has none to create. In the store
    that torchrun's agent keeps through restarts, the group's keys go under a prefix of this
    generation's own (rendezvous.py), so that a restarted group never reads a dead one's.
    """
    if "RANK" not in os.environ or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":  # rank 0 serves a new store
        dist.init_process_group(backend=backend)
        return True
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                is_master=False, timeout=JOIN_TIMEOUT)
    store = generation_store(agent_store, rank, size, JOIN_TIMEOUT)  # waits for every rank
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=size)
    return True


def shutdown(wait_for_others: bool = True) -> None:
    """Destroy the process group (a no-op without one), so that no process exits with a live
    one: NCCL and gloo may warn or abort when the interpreter tears it down at exit.

    ``wait_for_others`` meets every process at a barrier first, so that none closes its
    connections while a peer still uses them (gloo's transport thread can abort that peer). Pass
    False where the other processes may not come: after an error on this process they are
    elsewhere, and the barrier would wait for them until the collective timeout.
    """
    if not dist.is_initialized():
        return
    if wait_for_others:
        dist.barrier()  # a collective
    dist.destroy_process_group()
    _free_destroyed_groups()


def _free_destroyed_groups() -> None:
    """Let the destroyed groups be freed now, while the interpreter is whole.

    A group lives on, with its backend threads (gloo's run loops, the TCP store), while anything
    holds it: FSDP's device meshes do (``DeviceMesh._pg_registry`` in recent torch), and DTensor's
    sharding caches keep the meshes for the life of the process; a DDP module left in a
    reference cycle does too. Freed only in the interpreter's teardown, a gloo group made a rank
    abort now and then ("terminate called without an active exception", exit -6) after a run
    that had succeeded. Emptying each mesh's registry (the meshes are of no further use) and
    collecting the cycles frees the groups here.
    """
    device_mesh = sys.modules.get("torch.distributed.device_mesh")
    mesh_type = getattr(device_mesh, "DeviceMesh", None)
    if mesh_type is not None:
        for candidate in gc.get_objects():
            if type(candidate) is mesh_type:
                registry = getattr(candidate, "_pg_registry", None)
                if isinstance(registry, dict):
                    registry.clear()
    gc.collect()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over all processes in place (a collective: every rank must call it)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
        tensor.div_(dist.get_world_size())
    return tensor


def sum_over_processes(values: list[float], device: torch.device) -> list[float]:
    """Each value summed over all processes: how counts kept per process become the run's. One
    all-reduce of len(values) numbers and a host sync; a no-op alone."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    totals = torch.tensor(values, dtype=torch.float64, device=device)  # counts stay exact
    dist.all_reduce(totals)
    return totals.tolist()


def any_process(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag, true when it is true on at least one process: how ranks agree to stop or save
    at the same step. One all-reduce of len(flags) numbers and a host sync; a no-op alone."""
    return [total > 0 for total in sum_over_processes([float(flag) for flag in flags], device)]
