"""Worker for tests/test_fsdp.py, launched with ``torchrun --standalone --nproc_per_node=2``.

``--jobs`` (comma-separated) picks what this launch trains with ``train.strategy=fsdp`` under
``<run-dir>/<job>``; each writes the full (consolidated) parameters of the result to
``<out>/<job>.safetensors`` from rank 0:

- ``native_ga1``, ``native_ga2``, ``hf_ga1``: a tiny native transformer / Hugging Face Llama
  backbone, grad_accum 1 or 2 -- compared with one process accumulating both ranks' batches;
- ``resume``: EMA on, a global-RNG draw in the loss (each rank's stream matters), a checkpoint
  every 2 steps; the test runs it uninterrupted, killed (``ANYORDER_FAULT``) and resumed;
- ``experiment``: ``anyorder.experiment.train`` on a tiny Sudoku config, so the run directory
  (model.safetensors written from the gathered shards) can be read back by every command.

Batches are indexed by a *global* micro-batch number ``rank * grad_accum + micro``, so 2 ranks x
grad_accum G see exactly the batches of 1 rank x grad_accum 2G.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

try:
    import anyorder.train  # noqa: F401
except ImportError:  # not pip-installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from anyorder.model import ModelConfig, Transformer  # noqa: E402
from anyorder.train import Trainer, TrainConfig, cleanup, init_distributed, save_weights  # noqa: E402

V, MASK, L, BATCH, STEPS = 24, 23, 12, 4, 4
LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32,
         "tie_word_embeddings": False, "initializer_range": 0.2, "bos_token_id": None, "eos_token_id": None,
         "pad_token_id": None}


def make_model(kind: str = "native") -> torch.nn.Module:
    torch.manual_seed(1234)  # identical init on every rank
    if kind == "hf":
        from anyorder.model.hf_backbone import build_hf_backbone  # lazy: transformers only for this model
        return build_hf_backbone({"backbone": "hf", "from_config": LLAMA}, V, MASK, L)
    return Transformer(ModelConfig(vocab_size=V, mask_id=MASK, d_model=32, n_layers=2, n_heads=2, max_len=L))


def make_loss_fn(seed: int, grad_accum: int, global_rng: bool = False):
    """Masked-token cross-entropy on random sequences: a random half of the positions masked."""

    def loss_fn(model, step, micro, rank, world_size):
        index = rank * grad_accum + micro  # global micro-batch number within the step
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, index]).generate_state(1)[0]))
        x = torch.randint(0, MASK, (BATCH, L), generator=g)
        masked = torch.rand(BATCH, L, generator=g) < 0.5
        if global_rng:  # a draw from this rank's global stream, which a resume must restore
            masked = masked ^ (torch.rand(BATCH, L) < 0.2)
        device = next(model.parameters()).device
        x, masked = x.to(device), masked.to(device)
        logits = model(torch.where(masked, torch.full_like(x, MASK), x))
        loss = F.cross_entropy(logits[masked].float(), x[masked])
        return loss, {"tokens": int(masked.sum())}

    return loss_fn


def make_config(grad_accum: int, strategy: str = "fsdp", **kw) -> TrainConfig:
    return TrainConfig(steps=STEPS, batch_size=BATCH, grad_accum=grad_accum, lr=3e-3, warmup_steps=1,
                       weight_decay=0.1, grad_clip=1.0, log_every=2, progress=False, precision="fp32",
                       strategy=strategy, **kw)


def train_job(job: str, run_dir: Path, strategy: str = "fsdp", world: int = 2) -> Trainer:
    """The training of ``job``; with ``world=1`` the one-process reference (grad_accum doubled)."""
    if job == "resume":
        cfg = make_config(1, strategy, ema=0.8, checkpoint_every=2)
        trainer = Trainer(make_model(), make_loss_fn(cfg.seed, 1, global_rng=True), cfg, run_dir)
    else:
        kind, ga = job.split("_ga")
        ga = int(ga) * (2 // world)
        cfg = make_config(ga, strategy)
        trainer = Trainer(make_model(kind), make_loss_fn(cfg.seed, ga), cfg, run_dir)
    trainer.fit()
    return trainer


def experiment_job(run_dir: Path) -> None:
    from anyorder.config import load_config  # lazy: the experiment job only
    from anyorder.experiment import train
    root = Path(__file__).resolve().parents[1]
    over = ["task.n_train=200", "task.n_eval=16", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
            "train.steps=4", "train.warmup_steps=1", "train.batch_size=8", "train.progress=false",
            "train.checkpoint_every=2", "train.strategy=fsdp", "train.precision=fp32", "train.ema=0.9", "eval.n=8",
            f"out_dir={run_dir.parent}", f"name={run_dir.name}"]
    train(load_config(str(root / "configs" / "sudoku4.yaml"), over))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--jobs", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    info = init_distributed()
    out, runs = Path(args.out), Path(args.run_dir)
    for job in args.jobs.split(","):
        name = job.split(":")[0]  # "resume:b" trains the resume job in its own directory
        if name == "experiment":
            experiment_job(runs / job)
            continue
        trainer = train_job(name, runs / job.replace(":", "_"))
        tag = job.replace(":", "_")
        state = trainer.consolidated_state_dict()  # collective (the EMA weights when EMA is on)
        live = trainer.fsdp.full_state_dict(trainer.model) if trainer.ema is not None else None
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            save_weights(state, out / f"{tag}.safetensors")
            if live is not None:
                save_weights(live, out / f"{tag}_live.safetensors")
            print(f"job={job} world_size={info.world_size} backend={info.backend} step={trainer.step}", flush=True)
    cleanup()


if __name__ == "__main__":
    main()
