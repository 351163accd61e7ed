"""``edit``: Generate-then-Edit, proposed in "Parallelism and Generation Order in Masked
Diffusion Language Models: Limits Today, Potential Tomorrow". That paper does not publish its
exact rule; this is the rule implemented here:

1. **Draft**: a parallel decode, ``k`` tokens per step (default 4) or, with ``tau``, the
   ``threshold`` rule. Fast, but tokens committed in the same step were drawn from
   per-position marginals, not the joint, and may contradict each other.
2. **Edit rounds** (at most ``rounds``, default 2; a row stops as soon as a round flags nothing):
   - *re-score* every answer token with full context: put [MASK] on the token's own position
     and read the model's distribution there, everything else visible. This is the
     conditional p(x_i | x_-i) the MDM was trained to give; the logits of a *visible* position
     are never trained (the loss only scores masked positions), so "the probability with the
     token in place" would be an untrained number. Exact leave-one-out costs one forward pass
     per answer token; ``edit_groups=G`` masks G interleaved groups instead (positions with
     the same answer index mod G share a pass, so a position's neighbours stay visible):
     G passes per round, slightly less context.
   - *flag* a token when the model now disagrees (the argmax of p(. | x_-i) is another token)
     or is unsure (p(x_i | x_-i) < ``edit_tau``, default 0.5).
   - *regenerate*: re-mask all flagged tokens of the row at once and decode them again with
     the rest of the answer as context, ``edit_k`` (default 1) per step, most confident first
     (the decoder's ``score``) -- sequentially, because committing two conflicting corrections
     in the same step would repeat the draft's mistake.
   Answer tokens given in the input are re-scored as well (so a planted wrong token is fixed).

NFE is honest: draft steps + re-scoring passes (n answer tokens or G per round, for the rows
still editing) + regeneration steps. Trace: a regenerated token's ``finalize_step`` is the
step of its re-commit (the last change), ``confidence`` its probability then.
``decoder.last_info`` holds per-row counts: ``flagged`` (tokens re-masked), ``changed``
(tokens whose value differs from the draft), ``edit_nfe``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .loop import DECODERS, Decoder, check_range
from .threshold import threshold_commit


@DECODERS.register("edit")
class EditDecoder(Decoder):
    """Parallel draft (k per step, or threshold tau), then up to `rounds` edit rounds: re-score
    every token with its own position masked, re-mask those the model disagrees with or is
    unsure of, regenerate them one at a time."""

    def __init__(self, rounds: int = 2, edit_tau: float = 0.5, edit_k: int = 1, edit_groups: Optional[int] = None,
                 tau: Optional[float] = None, k=None, steps=None, **kw):
        if tau is not None and (k is not None or steps is not None):
            raise ValueError("decoder 'edit' drafts with either tau (threshold) or k/steps, not both")
        if k is None and steps is None and tau is None:
            k = 4
        super().__init__(k=k, steps=steps, **kw)
        self.tau = None if tau is None else check_range("tau", tau, 0.0, 1.0, lo_open=True)
        self.rounds = check_range("rounds", rounds, 0, kind=int)
        self.edit_tau = check_range("edit_tau", edit_tau, 0.0, 1.0)
        self.edit_k = check_range("edit_k", edit_k, 1, kind=int)
        self.edit_groups = None if edit_groups is None else check_range("edit_groups", edit_groups, 1, kind=int)
        self.last_info = {}

    def start(self, *args, **kw):
        st = super().start(*args, **kw)
        st.limit += (self.rounds + 1) * st.x.shape[1]  # room for the regeneration steps
        return st

    def choose(self, st, dist, proposal, allowed):
        if st.info.get("phase") == "edit":
            n = allowed.sum(-1).clamp(max=self.edit_k)
            return self.select(self.scores(dist, proposal, st.layout, st.gens), allowed, n)
        if self.tau is not None:
            return threshold_commit(dist.prob_of(proposal), allowed, self.tau)
        return super().choose(st, dist, proposal, allowed)

    def rescore(self, st, rows: torch.Tensor):
        """Leave-one-out (or G-group) re-scoring of every answer token of ``rows``:
        (p(x_i | x_-i), argmax) per position; NFE charged per row and pass."""
        B, L = st.x.shape
        tokens = st.answer & ~st.masked & rows.unsqueeze(-1)
        aidx = st.layout.aidx
        if self.edit_groups is None:
            group, n_groups = aidx, int(st.layout.n_answer.max())
        else:
            group, n_groups = aidx % self.edit_groups, self.edit_groups
        p_tok = torch.ones(B, L, dtype=torch.float64, device=st.x.device)
        top = st.x.clone()
        forward = self.probe_forward(st)
        for g in range(n_groups):
            hide = tokens & (group == g)
            used = hide.any(-1)
            if not used.any():
                continue
            logits = forward(torch.where(hide, torch.full_like(st.x, st.mask_id), st.x), st.masked | hide)
            logp = F.log_softmax(logits.double(), dim=-1)
            p_tok = torch.where(hide, logp.gather(-1, st.x.unsqueeze(-1)).squeeze(-1).exp(), p_tok)
            top = torch.where(hide, logp.argmax(-1), top)
            st.nfe += used.long()
        return tokens, p_tok, top

    def run(self, st, forward) -> None:
        super().run(st, forward)                                     # 1. the draft
        draft = st.x.clone()
        nfe_draft = st.nfe.clone()
        st.info["phase"] = "edit"
        editing = st.answer.any(-1)
        flagged_total = torch.zeros_like(st.nfe)
        for rnd in range(self.rounds):                               # 2. edit rounds
            st.reseed(rnd + 1)
            tokens, p_tok, top = self.rescore(st, editing)
            flagged = tokens & ((top != st.x) | (p_tok < self.edit_tau))
            editing = editing & flagged.any(-1)
            if not editing.any():
                break
            flagged_total += flagged.sum(-1)
            st.remask(flagged)
            super().run(st, self.probe_forward(st))                  # regenerate, edit_k per step
        self.last_info = {"flagged": flagged_total, "changed": ((st.x != draft) & st.answer).sum(-1),
                          "edit_nfe": st.nfe - nfe_draft}
