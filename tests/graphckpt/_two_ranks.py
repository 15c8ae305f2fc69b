"""Runs a test body on two CPU processes joined by a gloo process group (shared test helper)."""

from __future__ import annotations

import datetime
import faulthandler
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 90.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(
    rank: int,
    body: Callable[..., None],
    port: int,
    args: tuple[Any, ...],
    barrier_at_end: bool,
    group_timeout_s: float,
) -> None:
    # When the other rank fails, this one is terminated: print where it was, for the report.
    faulthandler.register(signal.SIGTERM, file=sys.stderr, all_threads=True, chain=True)
    torch.set_num_threads(1)  # two processes share the CI machine's cores
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=group_timeout_s),
    )
    body(rank, *args)
    # Both ranks finish their collectives before either tears the group down; tearing down
    # while the other rank still talks to the store aborts it.
    if barrier_at_end:
        dist.barrier()
    dist.destroy_process_group()


def run_two_ranks(
    body: Callable[..., None],
    *args: Any,
    barrier_at_end: bool = True,
    group_timeout_s: float = 60.0,
) -> None:
    """Calls ``body(rank, *args)`` on ranks 0 and 1 of a gloo group; fails on error or timeout.

    ``body`` must be a module-level function (it is pickled by name into the new processes).
    ``barrier_at_end=False`` skips the closing barrier, for bodies that break the group (a
    collective that timed out closes gloo's connections). ``group_timeout_s`` is the gloo
    group's timeout for collectives (under load one rank may compile for tens of seconds while
    the other waits in one).
    """
    context = mp.start_processes(
        _entry,
        args=(body, _free_port(), args, barrier_at_end, group_timeout_s),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=0.1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"two-rank test did not finish within {TIMEOUT_S:.0f} s")
    except mp.ProcessRaisedException as failure:
        # The failing rank's error first and its traceback's end, not pytest's long report of
        # the parent (CI logs cut long reports). The other rank's stack when it was stopped is
        # in the captured stderr.
        lines = str(failure).strip().splitlines()
        pytest.fail(
            f"rank {failure.error_index} failed: {lines[-1]}\n" + "\n".join(lines[-40:]),
            pytrace=False,
        )
