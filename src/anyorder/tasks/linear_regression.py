"""In-context linear regression (Garg et al., 2022, arXiv 2208.01066), under every order: one of
the three tasks of "On the Trainability of Masked Diffusion Language Models via Blockwise
Locality" (2026).

Per sequence: ``w ~ N(0, I_d)``, ``x_i ~ N(0, I_d)``, ``y_i = w·x_i``. The sequence is

    x_1, y_1, …, x_P, y_P | x_{P+1}, ?, …, x_{P+R}, ?

with every x and every y at its own position (L = 2(P+R)). The prompt is all x's and the first
P y's; the answer is the R query y's, so the answer index of query j is j (for Scatter "a unit is
one (x, y) pair" holds by construction). Positions carry a d-vector: x itself, or
``ỹ = [y, 0, …, 0]`` (Garg's zero padding), read in by one shared ``Linear(d, width)``.

Orders work on positions, not values: the task hands them an integer *proxy* ``x0`` (all zeros,
vocabulary {0, [MASK]=1}) and keeps the real values in a :class:`RegressionBatch`. The plan's
``tokens == mask_id`` says which slots are masked, ``plan.index`` which position a slot holds.

Dimension curriculum (Garg): coordinates beyond ``d_cur`` are zeroed, the input stays d-wide;
``d_cur = min(d, d_start + d_inc · (step // d_interval))``.

Threshold τ (that paper's "validation MSE < 0.1", stated for d ∈ {10, 15, 20}): every
predictor's MSE here scales with d (zero predictor: d; a model that recovers w up to a relative
error ε: ε·d), so τ is set on the normalised MSE, MSE/d < ``tau_nmse``; the default 0.01 equals
the paper's MSE < 0.1 at its smallest d = 10 and means "1 % of the zero predictor's error" at every d.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch

from ..checks import check_float, check_int, check_mapping, check_memory
from .base import TASKS, Task


@dataclass
class RegressionBatch:
    values: torch.Tensor   # [B, L, d] float: x at even positions, ỹ = [y, 0…] at odd ones
    targets: torch.Tensor  # [B, L] float: y at y positions, 0 at x positions
    answer: torch.Tensor   # [B, L] bool: the R query y positions
    xs: torch.Tensor       # [B, P+R, d]
    ys: torch.Tensor       # [B, P+R]
    d_cur: int             # active dimensions (curriculum); the rest of each x is zero

    @property
    def x0(self) -> torch.Tensor:
        """The integer proxy the orders build plans from (no value information in it)."""
        return torch.zeros(self.answer.shape, dtype=torch.long, device=self.answer.device)

    def __len__(self) -> int:
        return self.values.shape[0]

    def take(self, sl) -> "RegressionBatch":
        return RegressionBatch(self.values[sl], self.targets[sl], self.answer[sl], self.xs[sl], self.ys[sl],
                               self.d_cur)


@TASKS.register("linear_regression")
class LinearRegressionTask(Task):
    name = "linear_regression"
    vocab_size = 2   # the proxy vocabulary: 0 = "a value is here", 1 = [MASK]
    mask_id = 1
    objective = "regression"  # continuous values: a read-in/read-out transformer trained on MSE
    threshold = ("nmse", "<", 0.01)  # MSE/d < 0.01: the paper's MSE < 0.1 at d = 10
    secondary_metric = "mse"

    @classmethod
    def threshold_for(cls, options):
        metric, op, tau = cls.threshold
        if options.get("tau_nmse") is not None:  # a preset may loosen τ (the CPU study does)
            tau = float(options["tau_nmse"])
        return metric, op, tau

    def __init__(self, d: int = 20, n_prompt: int = 20, n_query: int = 20, curriculum: Optional[Dict] = None,
                 ridge_lambda: float = 0.1, tau_nmse: float = 0.01, n_eval: int = 1280, seed: int = 0):
        self.d = check_int("task.d", d, 1)
        self.P = check_int("task.n_prompt", n_prompt, 1, note=" (P, in-context pairs)")
        self.R = check_int("task.n_query", n_query, 1, note=" (R, query pairs)")
        self.ridge_lambda = check_float("task.ridge_lambda", ridge_lambda, 0)
        self.tau_nmse = check_float("task.tau_nmse", tau_nmse, 0, lo_open=True)
        self.n_eval, self.seed = check_int("task.n_eval", n_eval, 1), check_int("task.seed", seed, 0)
        self.seq_len = 2 * (self.P + self.R)
        check_memory(f"task.n_eval = {self.n_eval:,} regression prompts of {self.seq_len} slots x task.d = {self.d}",
                     4 * 3 * self.n_eval * self.seq_len * self.d, "make task.n_eval, task.d or the prompts smaller")
        self.curriculum = None
        if curriculum:
            cur = dict(check_mapping("task.curriculum", curriculum))
            unknown = set(cur) - {"d_start", "d_inc", "d_interval"}
            if unknown:
                raise ValueError(f"task.curriculum got unknown keys {sorted(unknown)}; valid: d_start, d_inc, d_interval")
            start, inc, every = (check_int(f"task.curriculum.{k}", cur.get(k, v)) for k, v in
                                 (("d_start", 1), ("d_inc", 1), ("d_interval", 2000)))
            if not 1 <= start <= self.d:
                raise ValueError(f"task.curriculum.d_start must be in [1, d={self.d}], got {start}")
            if inc < 0 or every < 1:
                raise ValueError(f"task.curriculum needs d_inc >= 0 and d_interval >= 1, got {inc}, {every}")
            self.curriculum = (start, inc, every)

    # -- data -------------------------------------------------------------------------------
    def d_at(self, step: int) -> int:
        """Active dimension at a training step (Garg's curriculum; d without one)."""
        if self.curriculum is None:
            return self.d
        start, inc, every = self.curriculum
        return min(self.d, start + inc * (int(step) // every))

    def sample(self, batch_size: int, gen: torch.Generator, d_cur: Optional[int] = None) -> RegressionBatch:
        d_cur = self.d if d_cur is None else int(d_cur)
        N = self.P + self.R
        xs = torch.randn(batch_size, N, self.d, generator=gen)
        w = torch.randn(batch_size, self.d, generator=gen)
        if d_cur < self.d:  # curriculum: zero the inactive coordinates (the input stays d-wide)
            xs[..., d_cur:] = 0
            w[..., d_cur:] = 0
        ys = torch.einsum("bnd,bd->bn", xs, w)
        L = self.seq_len
        values = torch.zeros(batch_size, L, self.d)
        values[:, 0::2] = xs
        values[:, 1::2, 0] = ys
        targets = torch.zeros(batch_size, L)
        targets[:, 1::2] = ys
        answer = torch.zeros(batch_size, L, dtype=torch.bool)
        answer[:, 2 * self.P + 1::2] = True
        return RegressionBatch(values, targets, answer, xs, ys, d_cur)

    def train_batch(self, batch_size: int, gen: torch.Generator, step: int = 0) -> RegressionBatch:
        return self.sample(batch_size, gen, self.d_at(step))

    def eval_set(self, n: Optional[int] = None) -> RegressionBatch:
        """A fixed validation set at the full dimension d (seeded by ``seed``, disjoint stream)."""
        gen = torch.Generator().manual_seed(10_000 + self.seed)
        return self.sample(self.n_eval if n is None else int(n), gen)

    # -- metrics ----------------------------------------------------------------------------
    def query_y(self, batch: RegressionBatch) -> torch.Tensor:
        return batch.ys[:, self.P:]

    def metrics(self, pred: torch.Tensor, batch: RegressionBatch) -> Dict[str, object]:
        """``pred`` [B, R] predictions of the query y's. MSE, MSE/d and the per-query curve."""
        se = (pred.double() - self.query_y(batch).double()) ** 2  # [B, R]
        mse = float(se.mean())
        return {"mse": mse, "nmse": mse / self.d, "below_tau": float(mse / self.d < self.tau_nmse),
                "mse_per_query": [float(v) for v in se.mean(0)]}

    def threshold_mse(self) -> float:
        return self.tau_nmse * self.d

    def headline(self) -> str:
        return "nmse"  # lower is better

    def baselines(self, batch: RegressionBatch) -> Dict[str, object]:
        """Exact baselines on the same prompts: least squares (minimum norm), ridge, zero."""
        y = self.query_y(batch).double()
        out = {}
        for name, pred in (("lstsq", least_squares(batch.xs, batch.ys, self.P)),
                           ("ridge", ridge(batch.xs, batch.ys, self.P, self.ridge_lambda)),
                           ("zero", torch.zeros_like(y))):
            se = (pred.double() - y) ** 2
            out[f"{name}_mse"] = float(se.mean())
            out[f"{name}_nmse"] = float(se.mean()) / self.d
            out[f"{name}_mse_per_query"] = [float(v) for v in se.mean(0)]
        out["lstsq_curve"] = [float(v) for v in lstsq_curve(batch.xs, batch.ys)]
        return out

    def describe(self) -> Dict[str, object]:
        return {"name": self.name, "d": self.d, "n_prompt": self.P, "n_query": self.R, "seq_len": self.seq_len,
                "curriculum": self.curriculum, "tau_nmse": self.tau_nmse, "threshold_mse": self.threshold_mse()}


# -- baselines (CPU, float64) -------------------------------------------------------------------
def least_squares(xs: torch.Tensor, ys: torch.Tensor, n_ctx: int) -> torch.Tensor:
    """[B, N − n_ctx] predictions of the later y's from the minimum-norm least-squares fit to the
    first n_ctx pairs (the only y's the model is shown). gelsd (SVD) returns the minimum-norm
    solution when n_ctx < d, like Garg's CPU gelsy; CUDA's driver would not, hence CPU."""
    X, Y = xs[:, :n_ctx].double().cpu(), ys[:, :n_ctx].double().cpu()
    w = torch.linalg.lstsq(X, Y.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)  # [B, d]
    return torch.einsum("bnd,bd->bn", xs[:, n_ctx:].double().cpu(), w)


def ridge(xs: torch.Tensor, ys: torch.Tensor, n_ctx: int, lam: float) -> torch.Tensor:
    """Ridge regression ŵ = (XᵀX + λI)⁻¹Xᵀy on the first n_ctx pairs (λ = 0 → least squares)."""
    if lam == 0:
        return least_squares(xs, ys, n_ctx)
    X, Y = xs[:, :n_ctx].double().cpu(), ys[:, :n_ctx].double().cpu()
    d = X.shape[-1]
    A = X.transpose(1, 2) @ X + lam * torch.eye(d, dtype=torch.float64)
    w = torch.linalg.solve(A, (X.transpose(1, 2) @ Y.unsqueeze(-1))).squeeze(-1)
    return torch.einsum("bnd,bd->bn", xs[:, n_ctx:].double().cpu(), w)


def lstsq_curve(xs: torch.Tensor, ys: torch.Tensor) -> np.ndarray:
    """Garg's curve: mean squared error of predicting pair k from the first k true pairs (k = 0
    predicts 0), k = 0 … N−1. The reference for "error against the number of examples"."""
    N = xs.shape[1]
    out = np.zeros(N)
    for k in range(N):
        if k == 0:
            pred = torch.zeros(xs.shape[0], dtype=torch.float64)
        else:
            pred = least_squares(xs[:, :k + 1], ys[:, :k + 1], k)[:, 0]
        out[k] = float(((pred - ys[:, k].double()) ** 2).mean())
    return out
