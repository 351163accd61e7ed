"""Continuous targets under any order: weighted MSE on a TrainPlan (the ``regression`` objective).

The orders build their plans from an integer proxy ``x0`` (the task's batch); the real
values travel beside the plan. Slot s of a plan holds sequence position ``plan.index[s]`` (s for
single-stream plans) and is masked iff ``plan.tokens[:, s] == mask_id``. Two-stream plans (ar,
block, jigsaw) thus give the clean stream the clean values of every position and the noisy
stream the mask vector at masked answers: the same teacher forcing as for tokens.

The loss is the token objective with squared error in place of cross-entropy: Σ w_i (ŷ_i − y_i)²
over scored positions / number of answer positions, with the same weightings (elbo, clamp,
uniform; focal needs a probability and is refused).

Validation and ``anyorder eval`` decode with :func:`anyorder.decoding.regression.predict` (the
order's own attention and commit rule) and report the task's MSE next to exact baselines.
Continuous values have no likelihood bound here.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..decoding.regression import predict
from ..model.continuous import ContinuousConfig, ContinuousTransformer
from ..orders.base import TrainPlan
from ..registry import unknown_choice
from .base import OBJECTIVES, Objective
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


def regression_eval_fn(task, order, n: Optional[int] = None, with_baselines: bool = True):
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


@OBJECTIVES.register("regression")
class RegressionObjective(Objective):
    """Weighted MSE of a continuous-valued transformer under any order with a fixed masking plan.
    The task hands out batches with ``x0`` (integer proxy), ``answer``, ``values``, ``targets``
    (see :class:`anyorder.tasks.linear_regression.RegressionBatch`) and metrics of predictions."""

    weightings = REGRESSION_WEIGHTINGS
    weighting_kind = "regression weighting"
    has_likelihood = False

    def __init__(self, task, order, weighting: Optional[str] = None):
        if order.objective != "nelbo":
            raise ValueError(f"task {task.name!r} trains with the regression objective, which needs an order "
                             f"with a fixed masking plan; order {order.name!r} trains with {order.objective!r}")
        super().__init__(task, order, weighting)

    def build_model(self, options):
        if options.get("backbone", "native") != "native":  # its read-in/read-out is the native network's
            raise ValueError(f"objective 'regression' trains its own continuous transformer: model.backbone must be "
                             f"'native', got {options['backbone']!r}")
        fields = ContinuousConfig.__dataclass_fields__
        cfg = ContinuousConfig(d_in=self.task.d, max_len=self.task.seq_len,
                               **{k: v for k, v in options.items() if k in fields})
        return ContinuousTransformer(cfg)

    def loss(self, model, batch_size, gen, step):
        batch = self.task.train_batch(batch_size, gen, step=step)
        plan = self.order.train_plan(batch.x0, self.order.layout(batch.answer), self.task.mask_id, gen)
        loss, stats = regression_loss(model, plan, batch.values, batch.targets, self.task.mask_id, self.weighting)
        stats.update(tokens=int(plan.tokens.numel()), d_cur=batch.d_cur)
        return loss, stats

    def validation(self, n, decoder_spec):
        fn = regression_eval_fn(self.task, self.order, n)
        return lambda model: {k: float(v) for k, v in fn(model).items() if isinstance(v, (int, float))}

    def evaluate(self, model, decoder_spec, n, batch_size=256, return_results=False):
        """The order's own prediction loop (no token decoder: ``decoder_spec`` is not used)."""
        res = {k[len("val_"):]: v for k, v in regression_eval_fn(self.task, self.order, n)(model).items()
               if isinstance(v, (int, float))}
        return (res, None) if return_results else res

    def likelihood(self, model, x0, answer, samples=8, batch_size=64, seed=0):
        raise ValueError(f"task {self.task.name!r} has continuous targets: there is no likelihood bound; "
                         f"its metric is the MSE (anyorder eval)")
