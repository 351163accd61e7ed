"""``precision: auto``: bf16 autocast only where this machine computes it faster than fp32.

bf16 halves the bytes a matmul moves, but only hardware with bf16 arithmetic (recent GPUs; CPUs
with AVX512-BF16 or AMX) turns that into speed. On a CPU without it, torch emulates bf16: on an
AVX2-only machine a 1024×1024 bf16 matmul ran about 100× slower than in fp32 and a bf16
training step about 15× slower. So the default asks the machine: :func:`probe` times a
square matmul in both dtypes (best of a few repeats, well under a second), and
:func:`resolve` picks bf16 only if it is at least :data:`MIN_SPEEDUP` × faster. The probe runs
once per process and device; the run records the choice and the timings behind it
(``run.json`` → ``run_info.precision``).
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional

import torch

# bf16 must beat fp32 by this factor (a margin over timing noise) to be chosen
MIN_SPEEDUP = 1.2
_CACHE: Dict[str, Dict[str, float]] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe(device: torch.device, n: int = 256, repeats: int = 3, budget_s: float = 0.5) -> Dict[str, float]:
    """Seconds per n×n @ n×n matmul in fp32 and bf16 on ``device`` (best of ``repeats``).

    The bf16 side stops early once it has spent ``budget_s``: an emulated bf16 matmul is slow
    enough that one timing already decides. Cached per process and device.
    """
    key = str(device)
    if key in _CACHE:
        return _CACHE[key]
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b  # warm-up (kernel selection, allocation)
        _sync(device)
        best, spent = float("inf"), 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            _sync(device)
            dt = time.perf_counter() - t0
            best, spent = min(best, dt), spent + dt
            if spent > budget_s:
                break
        out[f"{name}_s"] = best
    out["n"] = n
    _CACHE[key] = out
    return out


def resolve(requested: str, device: torch.device,
            probe_fn: Optional[Callable[[torch.device], Dict[str, float]]] = None) -> Dict[str, object]:
    """The precision a run uses: ``{"requested", "chosen", "reason"[, "probe"]}``.

    ``fp32`` and ``bf16`` are taken as asked; ``auto`` runs ``probe_fn`` (default :func:`probe`)
    and chooses bf16 when fp32_s / bf16_s >= :data:`MIN_SPEEDUP`, else fp32.
    """
    if requested != "auto":
        return {"requested": requested, "chosen": requested, "reason": "set in the config"}
    timings = (probe_fn or probe)(device)
    speedup = timings["fp32_s"] / max(timings["bf16_s"], 1e-12)
    chosen = "bf16" if speedup >= MIN_SPEEDUP else "fp32"
    verdict = "at least" if chosen == "bf16" else "less than"
    reason = (f"auto: a {timings.get('n', '?')}x{timings.get('n', '?')} bf16 matmul on {device} ran {speedup:.2f}x "
              f"the fp32 speed ({verdict} {MIN_SPEEDUP}x)")
    return {"requested": "auto", "chosen": chosen, "reason": reason,
            "probe": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in timings.items()}}


def autocast(device: torch.device, chosen: str):
    """The autocast context of a resolved precision (a no-op context for fp32)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=chosen == "bf16")


__all__ = ["MIN_SPEEDUP", "autocast", "probe", "resolve"]
