"""``learned`` (LoMDM): one group, an order learned per position, bidirectional attention.

From "Unifying Masked Diffusion Models with Various Generation Orders and Beyond" (arXiv
2602.02112). The order is not a fixed rule but two small networks (:mod:`anyorder.model.lomdm`):
g_φ predicts, from the clean sequence, the exponent k_i of each position's schedule
α_i = 1 − t^{k_i} (training), and g_ψ predicts it from the noisy sequence (decoding). So this
order carries the configuration (c1, c2, the heads' learning rate, centring), wraps a backbone
into a :class:`~anyorder.model.lomdm.LoMDM`, and names its objective, ``lomdm``
(:mod:`anyorder.objectives.lomdm`: three backbone passes, RLOO), instead of a fixed
:class:`TrainPlan`. Every masked position may be committed; the learned decoders
(``learned_ancestral``, ``learned_velocity``) decide which.
"""
from __future__ import annotations

from typing import Optional

from ..checks import check_bool, check_float
from ..model.lomdm import LoMDM, check_c
from .base import Order
from .registry import ORDERS


@ORDERS.register("learned")
class LearnedOrder(Order):
    attention = "bidirectional"
    reads_logp = False  # allowed() ignores logp
    default_weighting = "elbo"
    default_decoder = "learned_ancestral"
    objective = "lomdm"

    def __init__(self, c1: float = 0.7, c2: float = 0.65, head_lr: Optional[float] = None, center: bool = False,
                 **kw):
        super().__init__(**kw)
        self.c1, self.c2 = check_c(c1, c2)
        self.head_lr = check_float("order.head_lr", head_lr, 0, lo_open=True, optional=True)
        self.center = check_bool("order.center", center)  # centre the head's logits before NormSig (anyorder.model.lomdm.normsig)

    def wrap(self, backbone) -> LoMDM:
        """A :class:`LoMDM`: the backbone plus fresh g_φ / g_ψ heads with this order's c1, c2."""
        return LoMDM(backbone, self.c1, self.c2, center=self.center)

    def train_plan(self, x0, layout, mask_id, gen):
        raise ValueError("order 'learned' has no fixed masking plan: its schedule comes from the model's "
                         "g_φ head; it trains with the 'lomdm' objective (anyorder.objectives.lomdm.lomdm_loss)")

    def decode_attention(self, masked, layout):
        return None

    def label(self) -> str:
        return f"LoMDM (learned, c1={self.c1:g}, c2={self.c2:g})"

    def natural_decoder(self, seq_len, steps=None):
        return {"name": "learned_ancestral", "steps": int(steps or seq_len)}

    def describe(self):
        return {**super().describe(), "c1": str(self.c1), "c2": str(self.c2), "center": str(self.center)}
