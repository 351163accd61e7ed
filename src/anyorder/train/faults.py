"""Fault injection for the crash tests (tests/test_faults.py) -- inert unless ``ANYORDER_FAULT`` is set.

``ANYORDER_FAULT=POINT:N`` kills this process with SIGKILL the N-th time (1-based) execution
passes ``fault_point(POINT)``; ``POINT:N:sleep=S`` sleeps S seconds there instead (to signal it
from outside). Points: ``micro`` (before a micro-step: a signal there is handled at once), ``step`` (after an
optimizer step, before its log row), ``ckpt_write`` (between the files and
renames of a checkpoint write), ``eval`` (inside an evaluation, after eval_fn), ``final`` (after
the final evaluation's row, before summary.json). One environment lookup per call: free when unset.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Dict

_HITS: Dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get("ANYORDER_FAULT")
    if not spec:
        return
    point, _, rest = spec.partition(":")
    if point != name:
        return
    count, _, action = rest.partition(":")
    _HITS[name] = _HITS.get(name, 0) + 1
    if _HITS[name] != int(count or 1):
        return
    if action.startswith("sleep="):
        time.sleep(float(action[len("sleep="):]))
    else:
        os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["fault_point"]
