"""Continuous targets under any order: weighted MSE on a TrainPlan, and order-driven prediction.

The orders build their plans from an integer proxy ``x0`` (tasks/linear_regression.py); the real
values travel beside the plan. Slot s of a plan holds sequence position ``plan.index[s]`` (s for
single-stream plans) and is masked iff ``plan.tokens[:, s] == mask_id``. Two-stream plans (ar,
block, jigsaw) thus give the clean stream the clean values of every position and the noisy
stream the mask vector at masked answers: the same teacher forcing as for tokens.

The loss is the token objective with squared error in place of cross-entropy: Σ w_i (ŷ_i − y_i)²
over scored positions / number of answer positions, with the same weightings (elbo, clamp,
uniform; focal needs a probability and is refused).

:func:`predict` decodes with the order's own structure: each step predicts every masked query y
under ``order.decode_attention``, commits the positions ``order.allowed`` permits, and feeds the
predictions back as values. ``random`` commits everything in one shot; ar/block/prefix_block/
scatter/jigsaw commit in their sequence. A point predictor has no uncertainty, so Jigsaw's
entropy probe sees equal (uniform) "entropies" everywhere and starts blocks left to right.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Dict, Optional

import torch

from ..model.continuous import ContinuousConfig, ContinuousTransformer
from ..orders.base import Order, TrainPlan
from ..registry import unknown_choice
from .nelbo import token_weights

REGRESSION_WEIGHTINGS = ("elbo", "clamp", "uniform")


def plan_inputs(plan: TrainPlan, values: torch.Tensor, mask_id: int):
    """(slot values [B, L', d], slot masked [B, L'] bool, positions [L'] or None) of a plan."""
    slot_values = values if plan.index is None else values.index_select(1, plan.index)
    return slot_values, plan.tokens == mask_id, plan.index


def regression_loss(model, plan: TrainPlan, values: torch.Tensor, targets: torch.Tensor, mask_id: int,
                    weighting: str = "elbo"):
    """(loss, stats): Σ_scored w·(ŷ − y)² / number of answer positions (plan_loss's normaliser)."""
    if weighting not in REGRESSION_WEIGHTINGS:
        raise unknown_choice("regression weighting", weighting, list(REGRESSION_WEIGHTINGS))
    L = targets.shape[1]
    slot_values, masked, positions = plan_inputs(plan, values, mask_id)
    pred = model(slot_values, masked, attn_mask=plan.attn, positions=positions)[:, :L]
    se = torch.where(plan.scored, (pred - targets) ** 2, torch.zeros_like(pred))
    w = token_weights(weighting, plan, None)
    n_ans = (plan.answer.sum() if plan.answer is not None else plan.scored.numel()).clamp_min(1)
    loss = (w * se).sum() / n_ans
    with torch.no_grad():
        n_scored = plan.scored.sum().clamp_min(1)
        stats = {"masked_mse": float(se.sum() / n_scored), "masked_frac": float(plan.scored.sum() / n_ans)}
    return loss, stats


@torch.no_grad()
def predict(model, order: Order, values: torch.Tensor, answer: torch.Tensor):
    """(pred [B, R] of the answer positions in sequence order, nfe) decoded with the order's
    attention and commit rule; committed predictions are fed back as y values."""
    layout = order.layout(answer)
    vals = values.clone()
    vals[answer] = 0.0  # nothing of the true answers is visible (they are masked anyway)
    masked = answer.clone()
    out = torch.zeros(answer.shape, dtype=torch.float32, device=values.device)
    # uniform "log-probabilities" over the 2-symbol proxy vocabulary: only Jigsaw's probe reads them
    flat_logp = torch.full((*answer.shape, 2), -0.6931471805599453, device=values.device)
    nfe = 0
    while bool(masked.any()):
        pred = model(vals, masked, attn_mask=order.decode_attention(masked, layout))
        nfe += 1
        allow = order.allowed(masked, layout, flat_logp) & masked
        if not bool(allow[masked.any(-1)].any(-1).all()):
            raise RuntimeError(f"order {order.name!r} allowed no masked position in a row that has some")
        out = torch.where(allow, pred, out)
        vals[..., 0] = torch.where(allow, pred, vals[..., 0])
        masked = masked & ~allow
    B = answer.shape[0]
    return out[answer].view(B, -1), nfe


# -- integration: the regression twin of experiment.build / make_loss_fn / make_eval_fn ---------
def build_regression(cfg: Dict):
    """(task, order, model, weighting) from an ``anyorder``-style config whose task is continuous."""
    from ..orders.registry import ORDERS
    from ..tasks.base import build_task

    task = build_task(cfg["task"])
    ospec = dict(cfg.get("order", {"name": "random"}))
    order = ORDERS.get(ospec.pop("name"))(**ospec)
    weighting = cfg.get("weighting") or order.default_weighting
    if weighting not in REGRESSION_WEIGHTINGS:
        raise unknown_choice("regression weighting", weighting, list(REGRESSION_WEIGHTINGS))
    torch.manual_seed(int(cfg.get("seed", 0)))
    mcfg = ContinuousConfig(d_in=task.d, max_len=task.seq_len, **dict(cfg.get("model", {})))
    return task, order, ContinuousTransformer(mcfg), weighting


def make_regression_loss_fn(task, order, weighting: str, batch_size: int, seed: int):
    """loss_fn(model, step, micro, rank, world_size) with experiment.make_loss_fn's signature."""
    from ..experiment import step_generator

    def loss_fn(model, step, micro=0, rank=0, world_size=1):
        gen = step_generator(seed, step, micro, rank)
        batch = task.train_batch(batch_size, gen, step=step)
        plan = order.train_plan(batch.x0, order.layout(batch.answer), task.mask_id, gen)
        loss, stats = regression_loss(model, plan, batch.values, batch.targets, task.mask_id, weighting)
        stats.update(tokens=int(plan.tokens.numel()), d_cur=batch.d_cur)
        return loss, stats

    return loss_fn


def make_regression_eval_fn(task, order, n: Optional[int] = None, with_baselines: bool = True):
    """eval_fn(model) -> {val_mse, val_nmse, val_below_tau, per-query curve, baselines…}."""
    batch = task.eval_set(n)
    base = task.baselines(batch) if with_baselines else {}

    def eval_fn(model):
        was = model.training
        model.eval()
        pred, nfe = predict(model, order, batch.values, batch.answer)
        model.train(was)
        out = {f"val_{k}": v for k, v in task.metrics(pred, batch).items()}
        out["val_nfe"] = nfe
        out.update({f"val_{k}": v for k, v in base.items()})
        return out

    return eval_fn


def train_regression(cfg: Dict, log=lambda s: print(s, flush=True)) -> Dict:
    """A plain Adam loop (no trainer features) for tests and quick CPU runs; returns the history."""
    task, order, model, weighting = build_regression(cfg)
    tcfg = dict(cfg.get("train", {}))
    steps, bs = int(tcfg.get("steps", 1000)), int(tcfg.get("batch_size", 64))
    lr, warm = float(tcfg.get("lr", 1e-3)), int(tcfg.get("warmup_steps", 0))
    every = int(tcfg.get("eval_every", max(steps // 5, 1)))
    loss_fn = make_regression_loss_fn(task, order, weighting, bs, int(cfg.get("seed", 0)))
    eval_fn = make_regression_eval_fn(task, order, int(cfg.get("eval", {}).get("n", 512)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=float(tcfg.get("weight_decay", 0.0)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(warm, 1)))
    history, t0 = [], time.time()
    for step in range(steps):
        loss, stats = loss_fn(model, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(tcfg.get("grad_clip", 1.0)))
        opt.step()
        sched.step()
        if (step + 1) % every == 0 or step + 1 == steps:
            ev = eval_fn(model)
            row = {"step": step + 1, "loss": float(loss.detach()), "d_cur": stats["d_cur"], "time_s": time.time() - t0,
                   **{k: v for k, v in ev.items() if not isinstance(v, list)}}
            history.append({**row, "val_mse_per_query": ev["val_mse_per_query"]})
            log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
    return {"history": history, "model": model, "task": task, "order": order, "final": history[-1]}


def main(argv=None):
    import yaml

    p = argparse.ArgumentParser(description="Train in-context linear regression under one order (CPU loop).")
    p.add_argument("config")
    p.add_argument("--set", nargs="*", default=[], help="overrides like order.name=ar train.steps=500")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: tiny models gain nothing from more, and a shared CPU loses a lot)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = yaml.safe_load(open(args.config))
    for item in args.set:
        key, val = item.split("=", 1)
        node = cfg
        *path, last = key.split(".")
        for k in path:
            node = node.setdefault(k, {})
        node[last] = yaml.safe_load(val)
    res = train_regression(cfg)
    print(json.dumps({"final": {k: v for k, v in res["final"].items() if not isinstance(v, list)},
                      "val_mse_per_query": [round(v, 4) for v in res["final"]["val_mse_per_query"]]}))


if __name__ == "__main__":
    main()
