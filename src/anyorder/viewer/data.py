"""The page's data: saved decodes (``evaluation/saved.py``) turned into compact JSON.

One *panel* per (run, decoder); panels on the same prompts show side by side, example by example.
Per example row of a panel:

    x    the prompt tokens (answer positions hold [MASK])
    ans  the answer positions (indices into x)
    tok  the decoded tokens at the answer positions
    ev   events, flat, 5 numbers each, in record order: step, answer index, kind (0 commit,
         1 re-mask, 2 edit), token (-1 on re-mask), round(1000 * confidence)
    alt  per event K (token, round(1000 * probability)) pairs, flat (K = the panel's ``k_alt``)
    afp, tau, nfe, ok, steps   the row's AFP, Kendall τ_b (null when undefined), NFE, correctness,
         and the number of steps (the slider's range)

``vocab`` maps every token id that occurs to its display string (the task's ``token_str``).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch

from ..decoding.trace import afp, kendall_tau_b


def answer_index(answer_row: torch.Tensor) -> torch.Tensor:
    """[L] the answer index of each position (-1 on the prompt)."""
    aidx = torch.full(answer_row.shape, -1, dtype=torch.long)
    ans = answer_row.nonzero().flatten()
    aidx[ans] = torch.arange(len(ans))
    return aidx


def flat_events(ev, lo: int, hi: int, aidx: torch.Tensor):
    """Events ``lo:hi`` (one row's, in record order) as the page's flat ``ev`` and ``alt`` lists."""
    step, pos = ev.step[lo:hi], aidx[ev.pos[lo:hi]]
    conf = torch.round(ev.conf[lo:hi] * 1000).long()
    flat = torch.stack([step, pos, ev.kind[lo:hi], ev.token[lo:hi], conf], 1).flatten().tolist()
    alt = torch.stack([ev.alt_token[lo:hi], torch.round(ev.alt_prob[lo:hi].double() * 1000).long()], 2)
    return flat, alt.flatten().tolist(), (int(step.max()) + 1 if len(step) else 0)


def row_summary(trace, b: int, afp_b: float, tau_b: float, correct: bool) -> Dict[str, Any]:
    return {"afp": round(afp_b, 4), "tau": None if math.isnan(tau_b) else round(tau_b, 4),
            "nfe": int(trace.nfe[b]), "ok": bool(correct)}


def panel_rows(x0: torch.Tensor, answer: torch.Tensor, tokens: torch.Tensor, trace, correct: torch.Tensor,
               mask_id: int, limit: Optional[int] = None) -> List[Dict[str, Any]]:
    """The rows of one panel (the first ``limit`` rows)."""
    n = len(x0) if limit is None else min(limit, len(x0))
    ev = trace.events
    a_afp = afp(trace.finalize_step[:n], trace.answer[:n])
    a_tau = kendall_tau_b(trace.finalize_step[:n], trace.answer[:n])
    # events are sorted by row, then record order: each row's are one slice
    bounds = torch.searchsorted(ev.row, torch.arange(n + 1))
    rows = []
    for b in range(n):
        ans = answer[b].nonzero().flatten()
        flat, alt, steps = flat_events(ev, int(bounds[b]), int(bounds[b + 1]), answer_index(answer[b]))
        rows.append({"x": torch.where(answer[b], mask_id, x0[b]).tolist(), "ans": ans.tolist(),
                     "tok": tokens[b][ans].tolist(), "ev": flat, "alt": alt, "steps": steps,
                     **row_summary(trace, b, float(a_afp[b]), float(a_tau[b]), bool(correct[b]))})
    return rows


def panel_from_saved(saved: Dict[str, Any], limit: Optional[int] = None) -> Dict[str, Any]:
    """A panel from :func:`~anyorder.evaluation.saved.load_decode`'s dict."""
    run = saved["run"]
    return {"label": f"{run['order']} / {saved['label']}", "order": run["order"], "decoder": saved["label"],
            "task": run["task"], "grid": run["grid_shape"], "metrics": saved["metrics"],
            "k_alt": int(saved["trace"].events.alt_token.shape[1]),
            "rows": panel_rows(saved["x0"], saved["answer"], saved["tokens"], saved["trace"], saved["correct"],
                               run["mask_id"], limit)}


def page_data(saved_list: List[Dict[str, Any]], title: str, limit: Optional[int] = None) -> Dict[str, Any]:
    """Everything the static page needs, for several saved decodes (side by side)."""
    vocab: Dict[int, str] = {}
    for s in saved_list:
        vocab.update(s["vocab"])
    panels = [panel_from_saved(s, limit) for s in saved_list]
    return {"title": title, "mode": "static", "panels": panels, "vocab": {str(k): v for k, v in vocab.items()},
            "examples": max((len(p["rows"]) for p in panels), default=0)}
