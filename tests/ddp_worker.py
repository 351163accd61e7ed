"""Worker for tests/test_ddp.py, launched with ``torchrun --standalone --nproc_per_node=N``.

For each value G of ``--grad-accum`` (comma-separated) it trains a tiny regression MLP with the
Trainer in ``<run-dir>/ga{G}`` and writes, per rank, the final parameters to
``<out>/rank{r}_ga{G}.safetensors`` (rank 0 also writes ``init.safetensors``). Several trainings
share one launch because starting torchrun costs more than the training itself.

Batches are indexed by a *global* micro-batch number ``rank * grad_accum + micro``, so 2 ranks x
grad_accum=1 see exactly the batches of 1 rank x grad_accum=2 -- the test compares the two.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

try:
    import anyorder.train  # noqa: F401
except ImportError:  # not pip-installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from anyorder.train import (  # noqa: E402
    NonFiniteError,
    Trainer,
    TrainConfig,
    cleanup,
    init_distributed,
    save_weights,
)

IN_DIM, BATCH = 6, 8


def make_model(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(1234)  # identical init on every rank (DDP would broadcast rank 0's anyway)
    layers = [nn.Linear(IN_DIM, 16), nn.Tanh()] + ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(16, 1)]
    return nn.Sequential(*layers)


def make_loss_fn(seed: int, grad_accum: int, fail_at: int | None = None):
    target = torch.randn(IN_DIM, 1, generator=torch.Generator().manual_seed(99))

    def loss_fn(model, step, micro, rank, world_size):
        if step == fail_at:  # every rank fails at the same point, before any collective
            raise RuntimeError(f"simulated crash at step {step}")
        index = rank * grad_accum + micro  # global micro-batch number within the step
        s = int(np.random.SeedSequence([seed, step, index]).generate_state(1)[0])
        g = torch.Generator().manual_seed(s)
        x = torch.randn(BATCH, IN_DIM, generator=g)
        y = x @ target + 0.1 * torch.randn(BATCH, 1, generator=g)
        return nn.functional.mse_loss(model(x), y), {"tokens": BATCH}

    return loss_fn


def make_config(steps: int, grad_accum: int, **kw) -> TrainConfig:
    return TrainConfig(
        steps=steps, batch_size=BATCH, grad_accum=grad_accum, lr=1e-2, warmup_steps=2, weight_decay=0.1,
        grad_clip=0.5, log_every=2, progress=False, **kw,
    )


def resume_check(out: Path, run_dir: Path, steps: int, rank: int) -> None:
    """Dropout model (per-rank RNG streams matter): uninterrupted vs crash at step 3 + resume."""
    cfg = make_config(steps, 1, checkpoint_every=2, ema=0.8)
    a = Trainer(make_model(0.2), make_loss_fn(cfg.seed, 1), cfg, run_dir / "resume_a")
    a.fit()
    b = Trainer(make_model(0.2), make_loss_fn(cfg.seed, 1, fail_at=3), cfg, run_dir / "resume_b")
    try:
        b.fit()
        raise AssertionError("the simulated crash did not happen")
    except RuntimeError as e:
        assert "simulated crash" in str(e)
    b = Trainer(make_model(0.2), make_loss_fn(cfg.seed, 1), cfg, run_dir / "resume_b")
    summary = b.fit()
    assert summary["resumed_from"] == 2, summary
    save_weights(a.model, out / f"rank{rank}_resume_a.safetensors")
    save_weights(b.model, out / f"rank{rank}_resume_b.safetensors")
    save_weights(b.ema.module, out / f"rank{rank}_resume_b_ema.safetensors")
    save_weights(a.ema.module, out / f"rank{rank}_resume_a_ema.safetensors")


def nonfinite_check(out: Path, run_dir: Path, steps: int, rank: int) -> None:
    """Rank 1's loss is inf at step 2 while every gradient stays finite (an added constant): only the
    all-reduced check keeps the ranks in step. "skip": both skip it; "error": both raise."""
    clean = make_loss_fn(0, 1)

    def loss_fn(model, step, micro, rank_, world_size):
        loss, metrics = clean(model, step, micro, rank_, world_size)
        return (loss + float("inf") if (step, rank_) == (2, 1) else loss), metrics

    skip = Trainer(make_model(), loss_fn, make_config(steps, 1, nonfinite="skip"), run_dir / "nonfinite_skip")
    skip.fit()
    assert skip.nonfinite.skipped == 1, skip.nonfinite.skipped
    save_weights(skip.model, out / f"rank{rank}_nonfinite_skip.safetensors")
    stop = Trainer(make_model(), loss_fn, make_config(steps, 1), run_dir / "nonfinite_error")
    try:
        stop.fit()
        raise AssertionError("no NonFiniteError")
    except NonFiniteError as e:
        assert "at step 3/" in str(e) and stop.step == 2, (str(e), stop.step)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--grad-accum", default="1", help="comma-separated, one training per value")
    ap.add_argument("--resume-check", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)

    info = init_distributed()
    out = Path(args.out)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_weights(make_model(), out / "init.safetensors")
    for ga in (int(g) for g in args.grad_accum.split(",")):
        cfg = make_config(args.steps, ga)
        trainer = Trainer(make_model(), make_loss_fn(cfg.seed, ga), cfg, Path(args.run_dir) / f"ga{ga}")
        summary = trainer.fit()
        save_weights(trainer.model, out / f"rank{info.rank}_ga{ga}.safetensors")
        if info.is_main:
            print(f"world_size={info.world_size} backend={info.backend} ga={ga} summary={summary}", flush=True)
    if args.resume_check:
        resume_check(out, Path(args.run_dir), args.steps, info.rank)
        nonfinite_check(out, Path(args.run_dir), args.steps, info.rank)
    cleanup()


if __name__ == "__main__":
    main()
