"""``remask`` (after ReMDM: Wang et al., 2025, arXiv 2503.00307): committed tokens may be
re-masked and re-decoded.

Rule, per row and step: commit ``k`` tokens as the score decoders do (default ``top_prob``,
k = 2); then, while less than ``remask_until`` of the answer is committed, put [MASK] back on
the ``n_remask`` committed answer tokens with the *lowest confidence* (the probability the
model gave them when they were committed -- ReMDM's "conf" signal; a committed position's own
logits are not trained, so a fresh score would need an extra pass per token). Tokens committed
in this very step, and answer tokens given in the input, are never re-masked. A re-masked
position is decoded again later with more context, so its token can change.

This is ReMDM's "loop" idea with a count instead of a probability: during the remasking
window the masked fraction falls by k - n_remask per step instead of k, then plain decoding
finishes. Termination: a row never re-masks more than (tokens committed this step) - 1, so
every step makes net progress >= 1 and a row of n answer tokens ends in at most n steps.

Trace: ``finalize_step`` is the step of the *last* commit of a position (a position is
finalised by its last change; a re-masked token committed again counts as changed even if its
value is the same, since in between the answer was decoded without it), ``confidence`` its
probability then.
``DecodeResult.trace`` is the usual :class:`Trace`; the number of re-masked tokens per row is
in ``decoder.last_info["remasked"]``.

Options: ``k`` (default 2), ``n_remask`` in [0, k-1] (default 1), ``remask_until`` in [0, 1]
(default 0.75), ``score``, ``window`` and the sampling options.
"""
from __future__ import annotations

import torch

from .loop import DECODERS, Decoder, check_range


@DECODERS.register("remask")
class RemaskDecoder(Decoder):
    """Commit k per step, then re-mask the n_remask least confident earlier commits while less
    than remask_until of the answer is committed."""

    def __init__(self, n_remask: int = 1, remask_until: float = 0.75, k=None, **kw):
        if kw.get("steps") is not None:
            raise ValueError("decoder 'remask' commits decoder.k tokens per step; decoder.steps is not supported")
        super().__init__(k=2 if k is None else k, **kw)
        self.n_remask = check_range("n_remask", n_remask, 0, self.k - 1, kind=int)
        self.remask_until = check_range("remask_until", remask_until, 0.0, 1.0)
        self.last_info = {}

    def step(self, st, forward) -> None:
        before = st.masked
        super().step(st, forward)
        now = before & ~st.masked                                    # committed this step
        done = (st.answer & ~st.masked).sum(-1).double() / st.answer.sum(-1).clamp_min(1)
        n = torch.clamp(torch.clamp(now.sum(-1) - 1, max=self.n_remask), min=0)
        n = torch.where(done < self.remask_until, n, torch.zeros_like(n))
        eligible = st.answer & ~st.masked & ~now & (st.finalize >= 0)
        pick = self.select(-st.conf, eligible, n)                    # least confident first
        st.remask(pick)
        st.info["remasked"] = st.info.get("remasked", torch.zeros_like(st.nfe)) + pick.sum(-1)

    def run(self, st, forward) -> None:
        # the state goes backwards (re-masks), so no pass may reuse a KV cache of an undone state
        super().run(st, self.probe_forward(st))
        self.last_info = {"remasked": st.info.get("remasked", torch.zeros_like(st.nfe))}
