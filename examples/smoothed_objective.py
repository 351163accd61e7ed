"""A user-defined objective, registered by name (load with `plugins: [examples/smoothed_objective.py]`
and select it with `objective: label_smoothed`).

``label_smoothed``: the NELBO of any fixed order with label smoothing ε on the masked
cross-entropy (−(1−ε) log p(x) − ε mean_v log p(v), over the tokens the model can predict). Everything else — the model, validation,
decoding, the likelihood bound — is the ``nelbo`` objective's.
"""
import torch
import torch.nn.functional as F

from anyorder.objectives import OBJECTIVES
from anyorder.objectives.nelbo import NelboObjective, plan_logits, token_weights


@OBJECTIVES.register("label_smoothed")
class LabelSmoothedNelbo(NelboObjective):
    epsilon = 0.1

    def loss(self, model, batch_size, gen, step):
        x0, answer = self.task.train_batch(batch_size, gen)
        plan = self.order.train_plan(x0, self.order.layout(answer), self.task.mask_id, gen)
        logp = F.log_softmax(plan_logits(model, plan, self.extra).float(), dim=-1)
        logp_target = logp.gather(-1, plan.targets.unsqueeze(-1)).squeeze(-1)
        allowed = torch.isfinite(logp)  # the model never predicts [MASK]: its log-probability is -inf
        uniform_ce = -logp.masked_fill(~allowed, 0.0).sum(-1) / allowed.sum(-1)
        ce = -(1 - self.epsilon) * logp_target + self.epsilon * uniform_ce
        w = token_weights(self.weighting, plan, logp_target)
        loss = torch.where(plan.scored, w * ce, torch.zeros_like(ce)).sum() / plan.answer.sum().clamp_min(1)
        return loss, {"tokens": int(plan.tokens.numel())}
