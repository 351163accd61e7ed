"""Seed 004's toy: why committing several tokens at once picks the wrong pair (SPEC §6).

100 sequences of five tokens ``[A|A'] [B|B'] C D E``: 34 × AB, 21 × AB', 35 × A'B, 10 × A'B',
C D shared, E unique per sequence. Given ``_ _ C D _`` an MDM's marginals are P(A) = 0.55,
P(B) = 0.69, so committing both positions at once picks AB (joint 0.34) though the joint mode
is A'B (0.35). ``run_toy`` trains a small random-order MDM on the data and reads these numbers
off the model itself (the joints by the chain rule, A's position first).
"""
from __future__ import annotations

import time
from typing import Dict

import torch

from .base import TASKS, Task

A, A_, B, B_, C, D = range(6)
NAMES = {A: "A", A_: "A'", B: "B", B_: "B'"}
COUNTS = {(A, B): 34, (A, B_): 21, (A_, B): 35, (A_, B_): 10}


@TASKS.register("toy")
class ToyTask(Task):
    name = "toy"
    vocab_size = 6 + 100 + 1
    mask_id = 106
    seq_len = 5

    def __init__(self):
        rows = []
        for (a, b), c in COUNTS.items():
            rows += [[a, b, C, D]] * c
        self.data = torch.tensor([r + [6 + i] for i, r in enumerate(rows)])  # E unique

    def train_batch(self, batch_size, gen):
        # stratified: every sequence equally often (no data-sampling noise), then shuffled
        reps = -(-batch_size // len(self.data))
        idx = torch.arange(len(self.data)).repeat(reps)[torch.randperm(reps * len(self.data), generator=gen)][:batch_size]
        x0 = self.data[idx]
        return x0, torch.ones_like(x0, dtype=torch.bool)

    def eval_set(self, n):
        x0 = self.data[:n]
        return x0, torch.ones_like(x0, dtype=torch.bool)


def data_stats() -> Dict[str, float]:
    n = sum(COUNTS.values())
    return {"p_A": (COUNTS[(A, B)] + COUNTS[(A, B_)]) / n, "p_B": (COUNTS[(A, B)] + COUNTS[(A_, B)]) / n,
            "joint_AB": COUNTS[(A, B)] / n, "joint_A'B": COUNTS[(A_, B)] / n}


@torch.no_grad()
def model_probabilities(model, mask_id: int) -> Dict[str, object]:
    m = mask_id
    q = torch.tensor([[m, m, C, D, m]])
    p = torch.softmax(model(q).double(), -1)[0]
    p_first = {a: float(p[0, a]) for a in (A, A_)}
    marg_second = {b: float(p[1, b]) for b in (B, B_)}
    joint = {}
    for a in (A, A_):  # chain rule: P(a, b | C D) = P(a | C D) P(b | a C D)
        pb = torch.softmax(model(torch.tensor([[a, m, C, D, m]])).double(), -1)[0, 1]
        for b in (B, B_):
            joint[(a, b)] = p_first[a] * float(pb[b])
    prod = {(a, b): p_first[a] * marg_second[b] for a in (A, A_) for b in (B, B_)}
    name = lambda ab: NAMES[ab[0]] + NAMES[ab[1]]
    return {
        "p_A": round(p_first[A], 4), "p_B": round(marg_second[B], 4),
        "parallel_pick": name(max(prod, key=prod.get)),
        "joint_mode": name(max(joint, key=joint.get)),
        "joint_AB": round(joint[(A, B)], 4), "joint_A'B": round(joint[(A_, B)], 4),
        "product_AB": round(prod[(A, B)], 4), "product_A'B": round(prod[(A_, B)], 4),
        "mass_outside_pairs_first": round(1 - p_first[A] - p_first[A_], 4),
    }


def run_toy(steps: int = 1500, batch_size: int = 200, lr: float = 3e-3, seed: int = 0) -> Dict[str, object]:
    """Train a random-order MDM on the toy data; return the model's numbers next to the data's."""
    from ..model import ModelConfig, Transformer
    from ..objectives.nelbo import plan_loss
    from ..orders import build_order

    torch.manual_seed(seed)
    task = ToyTask()
    model = Transformer(ModelConfig(vocab_size=task.vocab_size, mask_id=task.mask_id, d_model=64,
                                    n_layers=2, n_heads=4, max_len=8))
    order = build_order("random")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * max(0.05, 1 - s / steps))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        x0, answer = task.train_batch(batch_size, gen)
        loss, _ = plan_loss(model, order.train_plan(x0, order.layout(answer), task.mask_id, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    out = model_probabilities(model, task.mask_id)
    out.update({"data": data_stats(), "train_seconds": round(time.time() - t0, 2), "steps": steps,
                "final_loss": round(float(loss.detach()), 4), "seed": seed})
    return out
