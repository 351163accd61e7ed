"""``precision: auto``: bf16 autocast only where this machine trains faster in it than in fp32.

bf16 halves the bytes a matmul moves, but only hardware with bf16 arithmetic (recent GPUs; CPUs
with AVX512-BF16 or AMX) turns that into speed. On a CPU without it, torch emulates bf16: on an
AVX2-only machine a 1024×1024 bf16 matmul ran ~125× slower than in fp32 and a bf16 training step
~15× slower (issue #11). And fast bf16 matmuls alone are not enough: on this project's current
machine (AMX-BF16) a bare 256×256 bf16 matmul ran far faster than fp32, yet the demo's training
step ran 0.85× the fp32 speed under bf16 autocast (the casts around small matmuls and the
element-wise work cost more than the matmuls save) and the 6×256 benchmark step 1.17×. So
:func:`probe` times what a step does: forward and backward of a small transformer (2 layers,
width 256, 512 tokens), fp32 and under bf16 autocast, interleaved, best of a few repeats, well
under a second, on a CPU by one thread's CPU time so that other processes on a shared machine
do not enter the measurement; :func:`resolve` picks bf16 only if it is at least
:data:`MIN_SPEEDUP` × faster (why that margin: at its definition). The probe runs once per process and device; the run records the choice and the timings
behind it (``run.json`` → ``run_info.precision``).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .checkpoint import STATE_FILE
from .distributed import is_distributed, reduce_device
from .files import read_json

# bf16 must beat fp32 by this factor on the probe to be chosen. The probe leaves out what a step
# keeps in fp32 (the optimizer, the loss in fp32): here it measured 1.3-1.4x where the demo's step
# ran 0.85x and the 6x256 benchmark step 1.17x. A 2x margin picks bf16 where it clearly wins (a GPU
# against fp32 matmuls) and keeps a borderline CPU from flipping between runs.
MIN_SPEEDUP = 2.0
_CACHE: Dict[str, Dict[str, float]] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe(device: torch.device, d: int = 256, n_layers: int = 2, length: int = 64, batch: int = 8,
          repeats: int = 4, budget_s: float = 1.0) -> Dict[str, float]:
    """Seconds per forward + backward of a small anyorder transformer (``n_layers`` × ``d``, ``batch``
    × ``length`` tokens, cross-entropy on every position), fp32 and under bf16 autocast on
    ``device``: best of ``repeats``, the two interleaved.

    Stops early once ``budget_s`` is spent: an emulated bf16 pass is slow enough that one timing
    decides. Cached per process and device.
    """
    key = str(device)
    if key in _CACHE:
        return _CACHE[key]
    from ..model import ModelConfig, Transformer  # lazy: only a probe needs a model
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):  # the probe must not move the global RNG (a run's seed)
        model = Transformer(ModelConfig(vocab_size=257, mask_id=256, d_model=d, n_layers=n_layers,
                                        n_heads=max(1, d // 64), max_len=length)).to(device)
    x = torch.randint(0, 256, (batch, length), generator=gen).to(device)
    # On a CPU: one thread, timed by this thread's CPU time, so other processes taking the cores
    # (a shared machine) do not enter the measurement; on a GPU: wall clock after a synchronize.
    clock = time.thread_time if device.type == "cpu" else time.perf_counter
    threads = torch.get_num_threads()

    def once(dtype_name):
        t0 = clock()
        with autocast(device, dtype_name):
            logits = model(x)
        F.cross_entropy(logits.view(-1, logits.shape[-1]), x.view(-1)).backward()
        _sync(device)
        return clock() - t0

    best = {"fp32": float("inf"), "bf16": float("inf")}
    spent = 0.0
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        for i in range(repeats + 1):  # the first round warms up (kernel selection, allocation)
            for name in best:
                dt = once(name)
                spent += dt
                if i > 0 or dt > budget_s:
                    best[name] = min(best[name], dt)
            if spent > budget_s and all(v < float("inf") for v in best.values()):
                break
    finally:
        torch.set_num_threads(threads)
    out = {"fp32_s": best["fp32"], "bf16_s": best["bf16"], "d_model": d, "n_layers": n_layers,
           "tokens": batch * length}
    _CACHE[key] = out
    return out


def resolve(requested: str, device: torch.device,
            probe_fn: Optional[Callable[[torch.device], Dict[str, float]]] = None,
            checkpoint_dir: Optional[Path] = None) -> Dict[str, object]:
    """The precision a run uses: ``{"requested", "chosen", "reason"[, "probe"]}``.

    ``fp32`` and ``bf16`` are taken as asked; ``auto`` runs ``probe_fn`` (default :func:`probe`)
    and chooses bf16 when fp32_s / bf16_s >= :data:`MIN_SPEEDUP`, else fp32, unless the run
    resumes from a checkpoint in ``checkpoint_dir`` that trained under ``auto``: then it keeps
    that choice (a new probe on a busier machine may choose the other precision, and a resumed
    run must continue bit for bit).
    """
    if requested != "auto":
        return {"requested": requested, "chosen": requested, "reason": "set in the config"}
    state = Path(checkpoint_dir or "", STATE_FILE)
    if checkpoint_dir is not None and state.exists():
        try:
            before = ((read_json(state).get("extra") or {}).get("run_info") or {}).get("precision") or {}
        except (ValueError, AttributeError):  # unreadable: loading the checkpoint reports it, naming the file
            before = {}
        if before.get("requested") == "auto" and before.get("chosen") in ("fp32", "bf16"):
            return {**before, "reason": f"resumed: the checkpoint trained in {before['chosen']} ({before.get('reason')})"}
    timings = (probe_fn or probe)(device)
    speedup = timings["fp32_s"] / max(timings["bf16_s"], 1e-12)
    chosen = "bf16" if speedup >= MIN_SPEEDUP else "fp32"
    verdict = "at least" if chosen == "bf16" else "less than"
    reason = (f"auto: a small transformer's forward + backward on {device} ran {speedup:.2f}x the fp32 speed under "
              f"bf16 autocast ({verdict} the {MIN_SPEEDUP}x that bf16 needs)")
    agreed = rank0_choice(chosen)
    if agreed != chosen:
        reason += f"; this rank follows rank 0, which chose {agreed}"
    return {"requested": "auto", "chosen": agreed, "reason": reason,
            "probe": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in timings.items()}}


def rank0_choice(chosen: str) -> str:
    """Under DDP / FSDP, rank 0's choice on every rank (one broadcast; every rank calls this, as
    every rank builds its Trainer). Each rank probes on its own, and on a machine near the margin
    (this one: AMX bf16 at about 1.9x on the probe) ranks could choose differently: replicas would
    then compute their gradients in different precisions."""
    if not is_distributed():
        return chosen
    flag = torch.tensor([1 if chosen == "bf16" else 0], dtype=torch.int64, device=reduce_device())
    dist.broadcast(flag, src=0)
    return "bf16" if int(flag.item()) == 1 else "fp32"


def autocast(device: torch.device, chosen: str):
    """The autocast context of a resolved precision (a no-op context for fp32)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=chosen == "bf16")


__all__ = ["MIN_SPEEDUP", "autocast", "probe", "resolve"]
