"""``ar``: left to right. L singleton groups, causal attention.

Efficient plan (default): the two-stream pass with block size 1 and every answer position
masked, i.e. position i predicts x^i from a mask token at i and the clean x^{<i}. That is
teacher forcing in the masked-diffusion parameterisation, so the *same weights* can be scored
by the generic NELBO under the ε-AR schedule (:class:`~anyorder.orders.schedules.EpsAR`: position
i owns the time slice [(L−i)/L, (L−i+1)/L]) and must agree with it.
``plan="generic"`` trains with that noisy ε-AR estimator instead (for the OeMDM comparison).
"""
from __future__ import annotations

import torch

from . import masks
from .plans import block_rules, two_stream_plan
from .base import Layout, Order, lowest_open
from .random import ScheduledMasking
from .registry import ORDERS
from .schedules import EpsAR


@ORDERS.register("ar")
class AROrder(ScheduledMasking):
    attention = "causal"
    reads_logp = False  # allowed() ignores logp
    default_decoder = "left_to_right"

    def __init__(self, plan: str = "efficient", eps: float = 1e-3, prompt: str = "bidirectional", **kw):
        kw.pop("block_size", None)
        super().__init__(schedule=EpsAR(eps), block_size=1, **kw)
        if plan not in ("efficient", "generic"):
            raise ValueError(f"order.plan must be 'efficient' or 'generic', got {plan!r}")
        # "causal": the prompt reads itself left to right too, as an AR-pretrained model (a Hugging
        # Face causal LM) was trained to; then decoding equals the model's own greedy generate
        if prompt not in ("bidirectional", "causal"):
            raise ValueError(f"order.prompt must be 'bidirectional' or 'causal', got {prompt!r}")
        self.plan, self.prompt = plan, prompt

    def _prompt_rule(self, mask, layout, index=None):
        return masks.causal_prompt(mask, layout, index) if self.prompt == "causal" else mask

    @property
    def exact_likelihood(self) -> bool:
        return self.plan == "efficient"  # teacher forcing: every position from its clean prefix

    def label(self) -> str:
        return "AR"

    def natural_decoder(self, seq_len, steps=None):
        return {"name": "left_to_right", "k": 1, "cache": True}  # always seq_len steps, exact KV cache

    def train_attention(self, layout: Layout):
        return self._prompt_rule(masks.causal(layout), layout)

    def train_plan(self, x0, layout, mask_id, gen):
        if self.plan == "generic":
            return super().train_plan(x0, layout, mask_id, gen)
        ones = torch.ones(x0.shape, dtype=torch.float64, device=x0.device)
        plan = two_stream_plan(x0, layout, mask_id, layout.answer, ones, ones, *block_rules(layout))
        plan.attn = self._prompt_rule(plan.attn, layout, plan.index)
        return plan

    def decode_attention(self, masked, layout):
        return self._prompt_rule(masks.causal(layout), layout)

    def allowed(self, masked, layout, logp):
        return lowest_open(masked, layout, layout.aidx)  # only the leftmost masked answer position

    def frozen(self, masked, layout):
        # causal: everything left of the first hole is committed and sees only positions left of it
        m = masked & layout.answer
        first = torch.where(m, layout.aidx, layout.n_answer.unsqueeze(-1)).min(-1, keepdim=True).values
        return layout.prompt | (layout.answer & (layout.aidx < first))

    def live(self, masked, layout):
        return self.allowed(masked, layout, None)  # allowed() does not read logp
