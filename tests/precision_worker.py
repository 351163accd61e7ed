"""Worker for tests/test_precision.py, launched with ``torchrun --standalone --nproc_per_node=2``:
each rank resolves ``precision: auto`` with a probe that finds bf16 2.5x faster on rank 0 and no
faster on rank 1 (a machine near the margin, timed by two processes), and writes its choice to
``<out>/rank<r>.txt`` (``out``: the first argument; one file per rank, as printed lines of two
ranks can interleave)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

try:
    import anyorder.train  # noqa: F401
except ImportError:  # not pip-installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from anyorder.train import cleanup, init_distributed  # noqa: E402
from anyorder.train.precision import resolve  # noqa: E402

info = init_distributed()
ratio = 2.5 if info.rank == 0 else 1.0
got = resolve("auto", torch.device("cpu"), probe_fn=lambda device: {"fp32_s": ratio, "bf16_s": 1.0})
Path(sys.argv[1], f"rank{info.rank}.txt").write_text(f"rank {info.rank} chose {got['chosen']}: {got['reason']}")
cleanup()
