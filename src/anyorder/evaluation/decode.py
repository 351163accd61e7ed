"""Decode a task's held-out answers from scratch and score them: task metrics, AFP, Kendall τ, NFE."""
from __future__ import annotations

import time

import torch

from ..decoding import DecodeResult, Trace, build_decoder
from ..decoding.events import Events


def run_decoder(model, exp, decoder_spec, x0, answer, batch_size: int = 256, return_results: bool = False,
                alternatives: int = 0, on_step=None, first_row: int = 0):
    """Decode ``x0``'s answers (everything but the prompt masked) in batches; ``exp`` is anything
    with ``task`` and ``order`` (an :class:`~anyorder.experiment.Experiment` or an objective).
    Row i decodes with generator seed ``decoder.seed + first_row + i``, so batching never changes a
    row (``first_row``: where these rows start in a larger set, e.g. one held-out example).
    ``alternatives``: top tokens kept per commit in the trace's events; ``on_step(state)``: called
    after every step (neither changes the decode)."""
    dec = build_decoder(dict(decoder_spec) if isinstance(decoder_spec, dict) else decoder_spec)
    dec.alternatives, dec.on_step = alternatives, on_step
    device = next(model.parameters()).device  # the held-out set lives on the CPU; decode where the model is
    x0, answer = x0.to(device), answer.to(device)
    extra = {k: v.to(device) for k, v in exp.task.extra().items()}
    mask_id = exp.task.mask_id
    toks, traces = [], []
    t0 = time.perf_counter()
    for i in range(0, len(x0), batch_size):
        xb, ab = x0[i:i + batch_size], answer[i:i + batch_size]
        prompt = torch.where(ab, torch.full_like(xb, mask_id), xb)
        r = dec.decode(model, exp.order, prompt, ab, extra=extra, row_seeds=[dec.seed + first_row + j for j in range(i, i + len(xb))])
        toks.append(r.tokens)
        traces.append(r.trace)
    secs = time.perf_counter() - t0
    pred = torch.cat(toks)
    trace = Trace(*(torch.cat([getattr(t, f) for t in traces]) for f in ("finalize_step", "confidence", "answer", "nfe")))
    if all(t.events is not None for t in traces):
        trace.events = Events.cat([t.events for t in traces], list(range(0, len(x0), batch_size)))
    out = dict(exp.task.metrics(pred, x0, answer))
    out.update(trace.summary())
    out["tokens_per_s"] = float(answer.sum()) / secs
    if return_results:
        return out, DecodeResult(pred, trace)
    return out
