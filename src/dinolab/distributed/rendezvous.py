"""A fresh key namespace for each generation of torchrun workers: a restart never reads the
keys of the processes it replaces.

torchrun's elastic agent serves the workers' TCP store itself (``TORCHELASTIC_USE_AGENT_STORE``)
and keeps that one server, at the same MASTER_ADDR:MASTER_PORT, through every restart of the
worker group (torch 2.14's c10d rendezvous creates its shared store server once), while
``init_process_group`` writes the same keys in every generation: gloo's ``0//cpu//0/<rank>``,
the address of each rank's socket (NCCL's unique id likewise). A restarted rank that reads a peer's
key before the restarted peer has rewritten it gets the address of a process that is gone: it
connects to a closed port, or both sides wait for a connection that never comes, until the group
timeout (30 minutes on gloo). Whether a restart works is then a race between the two processes'
start-up times (docs/LOG.md has the reproduction).

``TORCHELASTIC_RESTART_COUNT`` cannot name the generation: each agent counts its own restarts,
and an agent that restarts its workers because another node's failed does not count one, so
nodes disagree (pytorch/pytorch#135712). The ranks of a generation therefore agree on a random
token, in a handshake in which every key read is named by a value its reader has just made up,
and create their group under ``dinolab/<token>/``:

- rank r > 0 writes a new nonce to ``hello/r``, waits for the key ``reply/<nonce>`` (the token),
  and confirms with the key ``ack/<token>/r``;
- rank 0 makes up the token, answers each ``hello/r`` it reads, and waits for every
  ``ack/<token>/r``.

A dead generation's ``hello`` gets an answer nobody reads; no key of a dead generation has the
name of a new nonce or token. A rank that does not come makes the others fail in one line after
``timeout``; the agent stops a generation whose worker died, so this wait is rarely reached.
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import torch.distributed as dist

JOIN_TIMEOUT = timedelta(minutes=10)  # as torchrun's rendezvous join timeout
KEYS = "dinolab/join"
POLL_SECONDS = 0.01  # the first pause between polls (then doubled, up to 1 s)


class JoinTimeout(RuntimeError):
    """Not every process of this torchrun generation came to create the process group."""


def generation_store(store: dist.Store, rank: int, world_size: int,
                     timeout: timedelta = JOIN_TIMEOUT) -> dist.Store:
    """``store`` under a prefix that this generation's ranks agreed on."""
    return dist.PrefixStore(f"dinolab/{generation_token(store, rank, world_size, timeout)}",
                            store)


def generation_token(store: dist.Store, rank: int, world_size: int,
                     timeout: timedelta = JOIN_TIMEOUT) -> str:
    """The token rank 0 made up for this generation, once every rank has it (polls of the store
    until then)."""
    deadline = time.monotonic() + timeout.total_seconds()
    if rank == 0:
        return _lead(store, world_size, deadline, timeout)
    return _follow(store, rank, deadline, timeout)


def _lead(store: dist.Store, world_size: int, deadline: float, timeout: timedelta) -> str:
    token = uuid.uuid4().hex
    answered: dict[int, str] = {}  # the nonce of each rank's hello, once answered
    waiting = set(range(1, world_size))
    pause = POLL_SECONDS
    while True:
        for peer in sorted(waiting):
            if store.check([f"{KEYS}/ack/{token}/{peer}"]):
                waiting.discard(peer)
                continue
            nonce = _read(store, f"{KEYS}/hello/{peer}")
            if nonce is not None and answered.get(peer) != nonce:
                store.set(f"{KEYS}/reply/{nonce}", token)
                answered[peer] = nonce
        if not waiting:
            return token
        if time.monotonic() > deadline:
            missing = ", ".join(str(peer) for peer in sorted(waiting))
            raise JoinTimeout(f"rank 0: rank(s) {missing} of this torchrun generation did not "
                              f"come to create the process group within {_text(timeout)}")
        pause = _sleep(pause)


def _follow(store: dist.Store, rank: int, deadline: float, timeout: timedelta) -> str:
    nonce = uuid.uuid4().hex
    store.set(f"{KEYS}/hello/{rank}", nonce)
    pause = POLL_SECONDS
    while (token := _read(store, f"{KEYS}/reply/{nonce}")) is None:
        if time.monotonic() > deadline:
            raise JoinTimeout(f"rank {rank}: rank 0 of this torchrun generation did not come to "
                              f"create the process group within {_text(timeout)}")
        pause = _sleep(pause)
    store.set(f"{KEYS}/ack/{token}/{rank}", "")
    return token


def _sleep(pause: float) -> float:
    """Sleep ``pause`` -> the next one: polls back off to 1 s, so that thousands of ranks
    waiting for a slow one do not flood the agent's store."""
    time.sleep(pause)
    return min(2 * pause, 1.0)


def _read(store: dist.Store, key: str) -> str | None:
    return store.get(key).decode() if store.check([key]) else None


def _text(timeout: timedelta) -> str:
    seconds = timeout.total_seconds()
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"
