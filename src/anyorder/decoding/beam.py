"""``beam``: commit the jointly most probable combination of the tokens committed together.

The toy of "Why mask diffusion does not work": given ``_ _ C D _`` the marginals are
P(A) = 0.55, P(B) = 0.69, so committing both masks in one step from the marginals picks AB
(joint 0.34) although the joint mode is A'B (0.35). That paper suggests beam search. Rule, per
row and step:

1. choose *which* positions to commit exactly as the score decoders do (``k`` per step or
   ``steps``, ``score``, the order's ``allowed``, semi-AR windows);
2. choose *their tokens* jointly: order the chosen positions by confidence (most confident
   first) and extend a beam of ``width`` partial assignments position by position. Extension
   j scores each hypothesis' candidates (its ``width`` most probable tokens) with the model's
   distribution at position j *given the hypothesis' earlier tokens filled in*: one forward
   pass per live hypothesis (the first position uses the step's own pass). Hypotheses are
   ranked by the sum of these conditional log-probabilities -- the chain rule, so the winner
   is the mode of the model's joint over the block (exactly, when width covers all
   combinations; approximately otherwise).
With one position per step it is the greedy decoder. Beam search is a search, so it is
greedy-only (``temperature`` 0). ``confidence`` in the trace is the token's conditional
probability along the chosen path. NFE: one per step plus one per live hypothesis and
extension (at most (k - 1) * width extra per step).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .loop import DECODERS, Decoder, check_range


@DECODERS.register("beam")
class BeamDecoder(Decoder):
    """Small-block beam search: the k positions committed together get the jointly most probable
    tokens (sequential conditioning, beam of `width`), not the product of marginals."""

    needs_all_logits = True  # the first extension reads the step's log-probs at the chosen positions

    def __init__(self, width: int = 4, k=None, **kw):
        if kw.get("temperature", 0.0) not in (0, 0.0, None):
            raise ValueError(f"decoder 'beam' is a greedy search: decoder.temperature must be 0, "
                             f"got {kw['temperature']}")
        if k is None and kw.get("steps") is None:
            k = 2
        super().__init__(k=k, **kw)
        self.width = check_range("width", width, 1, kind=int)

    def fill(self, st, commit, dist, proposal):
        tokens, conf = super().fill(st, commit, dist, proposal)
        if int(commit.sum(-1).max()) <= 1:
            return tokens, conf
        B, L = st.x.shape
        W = self.width
        dev = st.x.device
        neg_inf = torch.tensor(float("-inf"), dtype=torch.float64, device=dev)
        # positions of each row, most confident first (stable: leftmost first on ties)
        key = torch.where(commit, -conf, torch.full_like(conf, float("inf")))
        pos = torch.sort(key, dim=-1, stable=True).indices             # [B, L]; the first n_b are the block
        n = commit.sum(-1)
        hyp_x = st.x.unsqueeze(1).repeat(1, W, 1)                       # [B, W, L] partial assignments
        hyp_conf = torch.zeros(B, W, L, dtype=torch.float64, device=dev)
        score = torch.full((B, W), float("-inf"), dtype=torch.float64, device=dev)
        score[:, 0] = 0.0                                               # one live (empty) hypothesis
        rows = torch.arange(B, device=dev)
        hyps = torch.arange(W, device=dev)
        forward = self.probe_forward(st)
        for j in range(int(n.max())):
            p_j = pos[:, j]                                             # [B] position extended now
            ext = n > j                                                 # rows extending at depth j
            cand_lp = torch.full((B, W, W), float("-inf"), dtype=torch.float64, device=dev)
            cand_tok = torch.zeros(B, W, W, dtype=torch.long, device=dev)
            for w in range(W):
                live = ext & torch.isfinite(score[:, w])
                if not live.any():
                    continue
                if j == 0:
                    lp = dist.logp()                                    # the step's own pass
                else:
                    filled = commit & (hyp_x[:, w] != st.mask_id)
                    lp = F.log_softmax(forward(hyp_x[:, w], st.masked & ~filled).double(), dim=-1)
                    st.nfe += live.long()
                lp_j = lp[rows, p_j]                                    # [B, V]
                top = torch.sort(lp_j, dim=-1, descending=True, stable=True)
                kk = min(W, lp_j.shape[-1])
                cand_tok[:, w, :kk] = top.indices[:, :kk]
                cand_lp[:, w, :kk] = torch.where(live.unsqueeze(-1), score[:, w:w + 1] + top.values[:, :kk], neg_inf)
            flat = torch.sort(cand_lp.view(B, W * W), dim=-1, descending=True, stable=True)
            keep = flat.indices[:, :W]                                  # best W extensions
            parent, choice = keep // W, keep % W
            new_x = hyp_x[rows.unsqueeze(-1), parent].clone()          # [B, W, L]
            new_conf = hyp_conf[rows.unsqueeze(-1), parent].clone()
            tok = cand_tok[rows.unsqueeze(-1), parent, choice]          # [B, W]
            best = flat.values[:, :W]
            step_lp = torch.where(torch.isfinite(best), best - score[rows.unsqueeze(-1), parent], neg_inf)
            new_x[rows.unsqueeze(-1), hyps, p_j.unsqueeze(-1).expand(B, W)] = tok
            new_conf[rows.unsqueeze(-1), hyps, p_j.unsqueeze(-1).expand(B, W)] = step_lp.exp()
            upd = ext.view(B, 1, 1)
            hyp_x = torch.where(upd, new_x, hyp_x)
            hyp_conf = torch.where(upd, new_conf, hyp_conf)
            score = torch.where(ext.unsqueeze(-1), best, score)
        best_x, best_conf = hyp_x[:, 0], hyp_conf[:, 0]                # sorted: index 0 is the best
        return torch.where(commit, best_x, tokens), torch.where(commit, best_conf, conf)
