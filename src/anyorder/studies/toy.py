"""The A/B toy of "Why mask diffusion does not work": committing two tokens at once picks AB.

The data are :class:`~anyorder.tasks.toy.ToyTask`'s 100 sequences ``[A|A'] [B|B'] C D E``
(34 AB, 21 AB', 35 A'B, 10 A'B'). Given ``_ _ C D _`` an MDM's marginals are P(A) = 0.55,
P(B) = 0.69, so committing both positions at once picks AB (joint 0.34) though the joint mode
is A'B (0.35). :func:`run_toy` trains a small random-order MDM on the data by gradient descent
on the *exact* expectation of the random-masking objective (:func:`all_pattern_batch`) and
reads these numbers off the model itself (the joints by the chain rule, A's position first);
``anyorder toy`` prints them.
"""
from __future__ import annotations

import itertools
import json
import math
import time
from typing import Dict

import torch
import torch.nn.functional as F

from ..model import ModelConfig, Transformer
from ..tasks.toy import A, A_, B, B_, C, COUNTS, D, NAMES, ToyTask

DEFAULT_STEPS = 600


def data_stats() -> Dict[str, float]:
    """The data's marginals P(A), P(B) and joints P(A, B), P(A', B) given ``_ _ C D _``."""
    n = sum(COUNTS.values())
    return {"p_A": (COUNTS[(A, B)] + COUNTS[(A, B_)]) / n, "p_B": (COUNTS[(A, B)] + COUNTS[(A_, B)]) / n,
            "joint_AB": COUNTS[(A, B)] / n, "joint_A'B": COUNTS[(A_, B)] / n}


@torch.no_grad()
def model_probabilities(model, mask_id: int) -> Dict[str, object]:
    """The model's marginals, chain-rule joints and products of marginals given ``_ _ C D _``."""
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


def all_pattern_batch(data: torch.Tensor, mask_id: int):
    """Every sequence under every non-empty mask pattern, with the pattern's probability under
    the linear schedule, P(k of n masked) = ∫ t^k (1−t)^(n−k) dt = B(k+1, n−k+1).

    Training on this batch is gradient descent on the *exact* expectation of the random-order
    objective (uniform weighting) -- no Monte-Carlo noise. The toy needs that: telling the joint
    mode A'B (0.35) from AB (0.34) takes probabilities accurate to ~0.005, which minibatch SGD
    with random masks does not reach (see the README's section on the toy).
    """
    N, n = data.shape
    pats = torch.tensor([p for p in itertools.product([0, 1], repeat=n) if any(p)], dtype=torch.bool)
    k = pats.sum(-1).tolist()
    w = torch.tensor([math.gamma(a + 1) * math.gamma(n - a + 1) / math.gamma(n + 2) for a in k])
    w = w / w.sum()
    P = len(pats)
    x = data.unsqueeze(1).expand(N, P, n).reshape(-1, n)
    masked = pats.unsqueeze(0).expand(N, P, n).reshape(-1, n)
    weight = w.unsqueeze(0).expand(N, P).reshape(-1) / N
    return torch.where(masked, torch.full_like(x, mask_id), x), x, masked, weight


def merged_targets(z: torch.Tensor, x: torch.Tensor, masked: torch.Tensor, weight: torch.Tensor, vocab: int):
    """The same objective on the distinct inputs only: ``(inputs [U, n], rows [R], keys [K], w [K])``.

    Many rows of :func:`all_pattern_batch` are the same input (a pattern that masks E leaves
    only the A/B pair visible: 4 inputs, not 100), and their losses share one forward pass:
    Σ_r weight_r Σ_{i masked} −log p(x_ri | z_r) = Σ_k w_k · (−log p(v_k | row_k)) summed over
    distinct (input, position, target) triples k with their summed weights. ``rows`` are the
    scored (input, position) slots, flattened; ``keys`` index row·V + target within them.
    3100 rows become 1536 inputs here: half the forward and backward work, the same gradient up
    to float rounding.
    """
    inputs, inv = torch.unique(z, dim=0, return_inverse=True)
    n = z.shape[1]
    slot = inv.unsqueeze(1) * n + torch.arange(n)                       # [R0, n] flattened (input, position)
    triple = (slot * vocab + x)[masked]                                 # (slot, target) of every scored entry
    keys, kinv = torch.unique(triple, return_inverse=True)
    w = torch.zeros(len(keys), dtype=weight.dtype).index_add_(0, kinv, weight.unsqueeze(1).expand_as(x)[masked])
    rows, rinv = torch.unique(keys // vocab, return_inverse=True)
    return inputs, rows, rinv * vocab + keys % vocab, w


def run_toy(steps: int = DEFAULT_STEPS, lr: float = 5e-3, seed: int = 0, d_model: int = 32) -> Dict[str, object]:
    """Train a random-order MDM on the toy data; return the model's numbers next to the data's."""
    torch.manual_seed(seed)
    task = ToyTask()
    model = Transformer(ModelConfig(vocab_size=task.vocab_size, mask_id=task.mask_id, d_model=d_model,
                                    n_layers=2, n_heads=4, max_len=8))
    inputs, rows, keys, w = merged_targets(*all_pattern_batch(task.data, task.mask_id), task.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    t0 = time.time()
    for _ in range(steps):
        # the head only on the scored slots (objectives/rows.py does the same for every order)
        h = model.hidden(inputs).reshape(-1, model.cfg.d_model)[rows]
        loss = -(w * F.log_softmax(model.head_logits(h), -1).view(-1)[keys]).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    out = model_probabilities(model, task.mask_id)
    out.update({"data": data_stats(), "train_seconds": round(time.time() - t0, 2), "steps": steps,
                "final_loss": round(float(loss.detach()), 4), "seed": seed})
    return out


# -- command line (``anyorder toy``) -----------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"full-batch steps (default {DEFAULT_STEPS})")
    p.add_argument("--seed", type=int, default=0)


def format_toy(res: Dict[str, object]) -> str:
    """The model's numbers beside the data's, as ``anyorder toy`` prints them."""
    d, key = res["data"], "joint_A'B"
    return "\n".join([
        f"model (trained {res['train_seconds']} s) vs data, given  _ _ C D _",
        f"  P(A)      {res['p_A']:.3f}   data {d['p_A']:.2f}",
        f"  P(B)      {res['p_B']:.3f}   data {d['p_B']:.2f}",
        f"  P(A,B)    {res['joint_AB']:.3f}   data {d['joint_AB']:.2f}",
        f"  P(A',B)   {res[key]:.3f}   data {d[key]:.2f}",
        f"  committing both at once picks {res['parallel_pick']}; the joint mode is {res['joint_mode']}"])


def run_from_args(args) -> Dict[str, object]:
    res = run_toy(steps=args.steps, seed=args.seed)
    print(json.dumps(res) if args.json else format_toy(res))
    return res
