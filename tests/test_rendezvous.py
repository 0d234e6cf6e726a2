"""A restarted torchrun generation creates its process group from keys of its own, never from
those the generation it replaces left in the agent's store (distributed/rendezvous.py).

This file is also the worker of the two-generation test (``python tests/test_rendezvous.py``,
started with torchrun's variables).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_overrides, wait_all

from dinolab.distributed.rendezvous import JoinTimeout, generation_token

TIMEOUT_S = 120
SHORT = timedelta(seconds=1)


def agent_store() -> dist.TCPStore:
    """A store server as torchrun's agent keeps one, through every restart of its workers."""
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def join(port: int, world_size: int, delays: dict[int, float] | None = None,
         timeout: timedelta = timedelta(seconds=30)) -> list[str | JoinTimeout]:
    """One generation: a thread per rank, each with its own client -> each rank's token (or its
    error); ``delays``: seconds a rank starts late."""
    results: list[str | JoinTimeout] = [""] * world_size

    def rank_thread(rank: int) -> None:
        time.sleep((delays or {}).get(rank, 0.0))
        client = dist.TCPStore("127.0.0.1", port, is_master=False)
        try:
            results[rank] = generation_token(client, rank, world_size, timeout)
        except JoinTimeout as error:
            results[rank] = error

    threads = [threading.Thread(target=rank_thread, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_every_rank_of_a_generation_gets_the_same_new_token() -> None:
    server = agent_store()
    first = join(server.port, 4)
    assert len(set(first)) == 1 and isinstance(first[0], str) and first[0], first
    # The next generation among the keys of the first, with ranks late as a slow start makes
    # them: a token of its own, the same on every rank.
    second = join(server.port, 4, delays={2: 0.5, 0: 0.2})
    assert len(set(second)) == 1 and isinstance(second[0], str), second
    assert second[0] != first[0]


def test_a_dead_generation_keys_do_not_stand_in_for_a_rank_that_has_not_come() -> None:
    """Rank 1 of the last generation left its hello, reply and ack: the new rank 0 waits for the
    new rank 1 instead of taking those, and says so in one line when it does not come; a rank 1
    whose rank 0 does not come likewise."""
    server = agent_store()
    assert all(isinstance(token, str) for token in join(server.port, 2))
    client = dist.TCPStore("127.0.0.1", server.port, is_master=False)
    started = time.monotonic()
    with pytest.raises(JoinTimeout, match=r"^rank 0: rank\(s\) 1 of this torchrun generation did "
                                          r"not come to create the process group within 1 s$"):
        generation_token(client, 0, 2, SHORT)
    with pytest.raises(JoinTimeout, match=r"^rank 1: rank 0 of this torchrun generation did not "
                                          r"come to create the process group within 1 s$"):
        generation_token(client, 1, 2, SHORT)
    assert time.monotonic() - started < 5


def test_train_stops_in_one_line_when_a_rank_does_not_come(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    """Under torchrun (its variables), rank 0 alone: `dinolab train` waits JOIN_TIMEOUT, then
    says which rank did not come, in one line, with exit status 6; nothing is written."""
    import dinolab.distributed.env as env
    from dinolab.cli import EXIT_NO_GROUP, main

    server = agent_store()
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(server.port),
                        "TORCHELASTIC_USE_AGENT_STORE": "True"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(env, "JOIN_TIMEOUT", SHORT)
    started = time.monotonic()
    status = main(["train", *tiny_overrides(tmp_path / "data", tmp_path / "run"),
                   "train.device=cpu"])
    assert time.monotonic() - started < 10
    assert status == EXIT_NO_GROUP
    assert capsys.readouterr().err == (
        "dinolab: error: rank 0: rank(s) 1 of this torchrun generation did not come to create "
        "the process group within 1 s\n")
    assert not (tmp_path / "run").exists()


# --- two generations of real processes, as torchrun restarts them --------------------------


def worker() -> None:
    from dinolab.distributed import init_distributed, shutdown

    assert init_distributed(torch.device("cpu"))
    total = torch.ones(1)
    dist.all_reduce(total)
    assert total.item() == dist.get_world_size()
    shutdown()


def generation(port: int, restart: int, late_rank: int | None, out_dir: Path) -> None:
    """Two worker processes with the variables torchrun's agent gives them; ``late_rank`` starts
    2 s after the other. Both must finish (a bounded wait: the old failure was a 30 min hang)."""
    processes = []
    for rank in range(2):
        if rank == late_rank:
            time.sleep(2)
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "TORCHELASTIC_USE_AGENT_STORE": "True",
               "TORCHELASTIC_RESTART_COUNT": str(restart), "OMP_NUM_THREADS": "1"}
        log = open(out_dir / f"restart{restart}_rank{rank}.log", "w")
        processes.append(subprocess.Popen([sys.executable, __file__], env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
        log.close()
    codes = wait_all(processes, TIMEOUT_S)
    for rank, code in enumerate(codes):
        text = (out_dir / f"restart{restart}_rank{rank}.log").read_text()
        assert code == 0, f"restart {restart}, rank {rank}: exit {code}\n{text[-2000:]}"


@pytest.mark.slow
def test_restarted_groups_with_a_late_rank_connect(tmp_path: Path) -> None:
    """The agent's store keeps each generation's gloo keys (each rank's address) when the next
    starts; the early rank of a restart used to read its late peer's old address and connect to
    a closed port, or wait with its peer for a connection that never came: before
    distributed/rendezvous.py, 6 runs of 6 of this test failed (5 hung, 1 connection refused)."""
    server = agent_store()
    generation(server.port, 0, None, tmp_path)
    assert server.num_keys() > 0  # what the first generation left
    generation(server.port, 1, 1, tmp_path)
    generation(server.port, 2, 0, tmp_path)


if __name__ == "__main__":
    worker()
