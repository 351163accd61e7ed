"""Worker for tests/test_ddp.py, launched with ``torchrun --standalone --nproc_per_node=N``.

Trains a tiny regression MLP with the Trainer and writes, per rank, its final parameters to
``<out>/rank{r}.safetensors`` (rank 0 also writes ``init.safetensors``).

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

from anyorder.train import Trainer, TrainConfig, cleanup, init_distributed, save_weights  # noqa: E402

IN_DIM, BATCH = 6, 8


def make_model() -> nn.Module:
    torch.manual_seed(1234)  # identical init on every rank (DDP would broadcast rank 0's anyway)
    return nn.Sequential(nn.Linear(IN_DIM, 16), nn.Tanh(), nn.Linear(16, 1))


def make_loss_fn(seed: int, grad_accum: int):
    target = torch.randn(IN_DIM, 1, generator=torch.Generator().manual_seed(99))

    def loss_fn(model, step, micro, rank, world_size):
        index = rank * grad_accum + micro  # global micro-batch number within the step
        s = int(np.random.SeedSequence([seed, step, index]).generate_state(1)[0])
        g = torch.Generator().manual_seed(s)
        x = torch.randn(BATCH, IN_DIM, generator=g)
        y = x @ target + 0.1 * torch.randn(BATCH, 1, generator=g)
        return nn.functional.mse_loss(model(x), y), {"tokens": BATCH}

    return loss_fn


def make_config(steps: int, grad_accum: int) -> TrainConfig:
    return TrainConfig(
        steps=steps, batch_size=BATCH, grad_accum=grad_accum, lr=1e-2, warmup_steps=2, weight_decay=0.1,
        grad_clip=0.5, log_every=2, progress=False,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--grad-accum", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)

    info = init_distributed()
    model = make_model()
    out = Path(args.out)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_weights(model, out / "init.safetensors")
    cfg = make_config(args.steps, args.grad_accum)
    trainer = Trainer(model, make_loss_fn(cfg.seed, cfg.grad_accum), cfg, args.run_dir)
    summary = trainer.fit()
    save_weights(trainer.model, out / f"rank{info.rank}.safetensors")
    if info.is_main:
        print(f"world_size={info.world_size} backend={info.backend} summary={summary}", flush=True)
    cleanup()


if __name__ == "__main__":
    main()
