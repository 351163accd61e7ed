"""``learned`` (LoMDM, seed 002, SPEC §4): one group, an order learned per position, bidirectional.

The order is not a fixed rule but two small networks (objectives/lomdm.py): g_φ predicts, from
the clean sequence, the exponent k_i of each position's schedule α_i = 1 − t^{k_i} (training),
and g_ψ predicts it from the noisy sequence (decoding). So this order only carries the
configuration (c1, c2, the heads' learning rate) and wraps a backbone into a
:class:`~anyorder.objectives.lomdm.LoMDM`; the training step is ``LoMDM.loss`` (three backbone
passes), not a :class:`TrainPlan`. Attention is bidirectional; every masked position may be
committed, and the learned decoders (``learned_ancestral``, ``learned_velocity``) decide which.
"""
from __future__ import annotations

from typing import Optional

from .base import Order
from .registry import ORDERS


@ORDERS.register("learned")
class LearnedOrder(Order):
    attention = "bidirectional"
    default_weighting = "elbo"
    default_decoder = "learned_ancestral"
    learned = True  # the experiment trains it with LoMDM.loss instead of train_plan

    def __init__(self, c1: float = 0.7, c2: float = 0.65, head_lr: Optional[float] = None, center: bool = False,
                 **kw):
        from ..objectives.lomdm import check_c  # lazy: objectives.lomdm imports orders.base

        super().__init__(**kw)
        self.c1, self.c2 = check_c(c1, c2)
        self.head_lr = None if head_lr is None else float(head_lr)
        self.center = bool(center)  # centre the head's logits before NormSig (see objectives.lomdm.normsig)

    def wrap(self, backbone):
        """A :class:`LoMDM`: the backbone plus fresh g_φ / g_ψ heads with this order's c1, c2."""
        from ..objectives.lomdm import LoMDM

        return LoMDM(backbone, self.c1, self.c2, center=self.center)

    def train_plan(self, x0, layout, mask_id, gen):
        raise ValueError("order 'learned' has no fixed masking plan: its schedule comes from the model's "
                         "g_φ head. Train with order.wrap(backbone).loss(x0, answer, gen) "
                         "(anyorder.objectives.lomdm.LoMDM.loss)")

    def decode_attention(self, masked, layout):
        return None

    def describe(self):
        return {**super().describe(), "c1": str(self.c1), "c2": str(self.c2), "center": str(self.center)}
