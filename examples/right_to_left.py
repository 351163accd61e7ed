"""A user-defined order and decoder, registered by name (load with `plugins: [examples/right_to_left.py]`).

``right_to_left``: autoregression from the last answer position to the first. Training is
exact teacher forcing with the same two-stream pass the built-in ``ar`` uses, only the rules
are mirrored; decoding may only fill the rightmost hole.
"""
import torch

from anyorder.decoding import DECODERS, Decoder
from anyorder.orders import masks
from anyorder.orders.plans import two_stream_plan
from anyorder.orders import ORDERS, Order


@ORDERS.register("right_to_left")
class RightToLeft(Order):
    attention = "anti-causal"
    reads_logp = False  # allowed() ignores logp: decoders need no full-vocabulary softmax for it
    default_decoder = "most_uncertain_last"

    def _pair(self, layout):
        return layout.aidx.unsqueeze(-1), layout.aidx.unsqueeze(-2)  # query, key

    def train_plan(self, x0, layout, mask_id, gen):
        q, k = self._pair(layout)
        ones = torch.ones(x0.shape, dtype=torch.float64)
        # noisy token i sees itself and the clean tokens to its right; the clean copy is anti-causal
        return two_stream_plan(x0, layout, mask_id, layout.answer, ones, ones, q == k, k > q, k >= q)

    def decode_attention(self, masked, layout):
        q, k = self._pair(layout)
        return masks.with_prompt(k >= q, layout)

    def allowed(self, masked, layout, logp):
        m = masked & layout.answer
        last = torch.where(m, layout.aidx, torch.full_like(layout.aidx, -1)).max(-1, keepdim=True).values
        return m & (layout.aidx == last)


@DECODERS.register("most_uncertain_last")
class MostUncertainLast(Decoder):
    """Commit the highest-margin positions first (a one-line variation of a built-in score)."""

    def scores(self, dist, proposal, layout, gens):
        # dist: the step's distribution at the positions it may commit (dist.where)
        top2 = dist.logp_at().topk(2, dim=-1).values.exp()
        return dist.put(top2[..., 0] - top2[..., 1])
