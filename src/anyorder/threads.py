"""CPU threads on a shared machine: OpenMP threads that sleep when idle, and ``--threads``.

torch's CPU kernels run on OpenMP threads. By default (GNU OpenMP) a thread that finishes its
share of a parallel region keeps spinning for a while, waiting for the next one; with another
busy process on the machine, the spinning threads take the cores the working threads need and
every parallel region waits for a descheduled thread. Measured on the demo's training step (2-core
CPU, 2 threads, a busy-loop process competing): 9-13 s per step with the default or ``ACTIVE``
wait policy against 0.25-1.3 s with ``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep), and
0.35-0.6 s without the competitor (README, "Threads"). The policy is read once, when torch loads
OpenMP, so :func:`quiet_openmp` must run before ``import torch``: the command line does it first.
This module imports nothing heavy for that reason.
"""
from __future__ import annotations

import os


def quiet_openmp() -> None:
    """Default ``OMP_WAIT_POLICY`` to PASSIVE (a value the user set is kept)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def set_threads(n) -> int:
    """Use ``n`` CPU threads for torch's intra-op work (``--threads``); returns it."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be an integer >= 1, got {n!r}")
    import torch  # lazy: importing this module must not load torch (see quiet_openmp)
    torch.set_num_threads(n)
    return n


__all__ = ["quiet_openmp", "set_threads"]
