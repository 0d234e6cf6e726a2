"""Process-group helpers; every one of them is a no-op in a single process."""

from dinolab.distributed.env import (
    all_reduce_mean,
    any_process,
    barrier,
    init_distributed,
    is_main_process,
    rank,
    shutdown,
    sum_over_processes,
    world_size,
)

__all__ = [
    "all_reduce_mean",
    "any_process",
    "barrier",
    "init_distributed",
    "is_main_process",
    "rank",
    "shutdown",
    "sum_over_processes",
    "world_size",
]
