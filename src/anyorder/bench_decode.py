"""``anyorder bench decode``, the comparison part: anyorder's loop against a plain reference loop.

The reference is LLaDA's published decoding loop, written here from the paper's algorithm
(Nie et al., 2025, "Large Language Diffusion Models", arXiv 2502.09992, §2.4 and App. B):
semi-autoregressive blocks of the answer, decoded left to right; inside a block the steps
are split evenly (each step unmasks the block's masked count / steps, remainder first); each
step runs the model on the whole sequence, predicts every masked token greedily, takes its
softmax probability as the confidence, and keeps the most confident predictions of the current
block, re-masking the rest ("low-confidence remasking"). Nothing of it is anyorder's code: it is
the loop a researcher writes from the paper, with one full softmax per step.

Measured, in one process, round-robin (best of ``repeats`` per runner, so the two sides see the
same machine load): the token identity with anyorder's ``top_prob`` decoder on the same schedule
(``steps`` and ``window`` = the paper's block length), the speed ratio at batch 1 and batch 8,
the loop's own share of a step (the time outside the model's forward passes) at a large
vocabulary, and the row-passes of batched ``threshold`` decoding, whose rows finish at
different times and then leave the forward pass.
"""
from __future__ import annotations

import platform
import time
from typing import Dict, List, Optional

import torch

from .decoding import build_decoder
from .decoding.forward import uncached_forward
from .model import ModelConfig, Transformer
from .orders import build_order


@torch.no_grad()
def llada_generate(model, prompt: torch.Tensor, answer_len: int, steps: int, block_len: int,
                   mask_id: int, max_steps: Optional[int] = None) -> torch.Tensor:
    """[B, P + answer_len] tokens: LLaDA's low-confidence remasking with semi-AR blocks, greedy.
    ``max_steps``: stop after that many steps (to time a few steps at a large vocabulary)."""
    B, P = prompt.shape
    x = torch.full((B, P + answer_len), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :P] = prompt
    n_blocks = answer_len // block_len
    steps_per_block = steps // n_blocks
    pos = torch.arange(P + answer_len, device=prompt.device)
    taken = 0
    for k in range(n_blocks):
        lo, hi = P + k * block_len, P + (k + 1) * block_len
        # how many tokens each step of this block unmasks, per row: an even split, remainder first
        n = (x[:, lo:hi] == mask_id).sum(-1, keepdim=True)
        base, rem = n // steps_per_block, n % steps_per_block
        plan = base + (torch.arange(steps_per_block, device=x.device) < rem).long()   # [B, steps]
        for s in range(steps_per_block):
            if max_steps is not None and taken == max_steps:
                return x
            taken += 1
            masked = x == mask_id
            logits = model(x)
            pred = logits.argmax(-1)
            p = torch.softmax(logits.double(), dim=-1)
            conf = p.gather(-1, pred.unsqueeze(-1)).squeeze(-1)
            conf = torch.where(masked & (pos < hi), conf, torch.full_like(conf, -float("inf")))
            keep = torch.zeros_like(masked)
            for b in range(B):
                keep[b, conf[b].topk(int(plan[b, s])).indices] = True
            x = torch.where(keep, pred, x)
    return x


def _model(vocab: int, d_model: int, n_layers: int, max_len: int, head_scale: float) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=vocab, mask_id=vocab - 1, d_model=d_model, n_layers=n_layers,
                                    n_heads=max(1, d_model // 64), max_len=max_len)).eval()
    with torch.no_grad():  # peaked distributions, like a trained model's (see bench_decode_cache)
        model.head.weight.mul_(head_scale)
    return model


def _prompts(batch: int, prompt_len: int, answer_len: int, vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab - 1, (batch, prompt_len), generator=gen)
    x = torch.cat([prompt, torch.full((batch, answer_len), vocab - 1, dtype=torch.long)], dim=1)
    answer = torch.zeros_like(x, dtype=torch.bool)
    answer[:, prompt_len:] = True
    return prompt, x, answer


class TimedForward:
    """A decoder's uncached forward that counts its seconds and the rows it ran (row-passes).
    ``all_rows``: run every row in every pass and drop the finished rows' logits afterwards (the
    loop's work before finished rows left the forward), for comparison."""

    def __init__(self, model, order, layout, extra=None, all_rows: bool = False):
        self.inner = uncached_forward(model, order, layout, extra)
        self.all_rows = all_rows
        self.seconds, self.row_passes, self.calls = 0.0, 0, 0

    def __call__(self, x, masked, rows=None, where=None):
        t0 = time.perf_counter()
        if self.all_rows:  # every row, every position's logits, as before
            out = self.inner(x, masked)
            out = out if rows is None else out[rows]
        else:
            out = self.inner(x, masked, rows, where)
        self.seconds += time.perf_counter() - t0
        self.row_passes += x.shape[0] if rows is None or self.all_rows else len(rows)
        self.calls += 1
        return out


def timed_decoder(spec, all_rows: bool = False):
    """A decoder whose forwards are :class:`TimedForward` (``dec.forwards`` lists them)."""
    dec = build_decoder(dict(spec))
    dec.forwards = []
    dec.make_forward = lambda *a: dec.forwards.append(TimedForward(*a, all_rows=all_rows)) or dec.forwards[-1]
    return dec


def compare_with_llada(vocab: int = 8192, d_model: int = 256, n_layers: int = 6, prompt_len: int = 32,
                       answer_len: int = 128, block: int = 32, steps: int = 128, batches=(1, 8),
                       repeats: int = 3, head_scale: float = 10.0) -> List[Dict[str, object]]:
    """Token identity and speed of anyorder's ``top_prob`` against :func:`llada_generate`."""
    model = _model(vocab, d_model, n_layers, prompt_len + answer_len, head_scale)
    order = build_order("random")
    spec = {"name": "top_prob", "steps": steps, "window": block}
    rows = []
    for batch in batches:
        prompt, x, answer = _prompts(batch, prompt_len, answer_len, vocab)
        runners = {"llada": lambda: llada_generate(model, prompt, answer_len, steps, block, vocab - 1),
                   "anyorder": lambda: build_decoder(dict(spec)).decode(model, order, x, answer).tokens}
        best, out = {k: float("inf") for k in runners}, {}
        for _ in range(repeats):            # round-robin: both sides see the same load
            for name, run in runners.items():
                t0 = time.perf_counter()
                out[name] = run()
                best[name] = min(best[name], time.perf_counter() - t0)
        rows.append({"batch": batch, "llada_seconds": round(best["llada"], 3),
                     "anyorder_seconds": round(best["anyorder"], 3),
                     "speedup_vs_llada": round(best["llada"] / best["anyorder"], 3),
                     "identical_tokens": bool(torch.equal(out["llada"], out["anyorder"]))})
    return rows


def loop_overhead(vocab: int = 126464, d_model: int = 256, n_layers: int = 6, prompt_len: int = 32,
                  answer_len: int = 128, block: int = 32, steps: int = 128, batch: int = 1,
                  head_scale: float = 10.0, max_steps: int = 32, repeats: int = 3) -> Dict[str, object]:
    """The loop's own share of a decoding step at a large vocabulary (LLaDA's is 126,464): the
    seconds outside the model's forward passes over the total, for anyorder's ``top_prob`` and for
    the plain reference loop. ``max_steps`` steps of each (the first block or so): every step costs
    the same forward, and the loop's work per step only shrinks later in a block. Each side runs
    ``repeats`` times, round-robin; the quickest run of each is reported (the machine at its
    quietest: a busy machine slows the forward and the loop differently)."""
    model = _model(vocab, d_model, n_layers, prompt_len + answer_len, head_scale)
    prompt, x, answer = _prompts(batch, prompt_len, answer_len, vocab)
    ref_fwd = {"s": 0.0}
    model_call = model.forward

    def timed(*a, **kw):  # the reference loop's forward, timed the same way
        t = time.perf_counter()
        try:
            return model_call(*a, **kw)
        finally:
            ref_fwd["s"] += time.perf_counter() - t

    runs: Dict[str, List] = {"anyorder": [], "llada": []}
    for _ in range(repeats):
        dec = timed_decoder({"name": "top_prob", "steps": steps, "window": block})
        t0 = time.perf_counter()
        try:
            dec.decode(model, build_order("random"), x, answer, max_steps=max_steps)
        except RuntimeError:  # stopped after max_steps, as asked
            pass
        fwd = dec.forwards[0]
        runs["anyorder"].append((time.perf_counter() - t0, fwd.seconds, fwd.calls))
        ref_fwd["s"] = 0.0
        model.forward = timed
        t0 = time.perf_counter()
        llada_generate(model, prompt, answer_len, steps, block, vocab - 1, max_steps=max_steps)
        runs["llada"].append((time.perf_counter() - t0, ref_fwd["s"], max_steps))
        del model.forward
    out = {"vocab": vocab, "batch": batch, "steps_timed": max_steps, "repeats": repeats}
    for name, r in runs.items():
        total, fwd_s, n = min(r)
        out[name] = {"seconds_per_step": round(total / n, 4), "forward_seconds_per_step": round(fwd_s / n, 4),
                     "loop_fraction": round(1 - fwd_s / total, 4),
                     "loop_fraction_all_runs": [round(1 - f / t, 4) for t, f, _ in r]}
    return out


def threshold_row_passes(vocab: int = 8192, d_model: int = 256, n_layers: int = 6, prompt_len: int = 32,
                         answer_len: int = 128, block: int = 32, batch: int = 8, tau: float = 0.5,
                         head_scale: float = 20.0, repeats: int = 2) -> Dict[str, object]:
    """Batched ``threshold`` decoding: rows commit different numbers of tokens per step and end at
    different steps (random weights: the head is sharpened x20 and tau is 0.5 so that confidences
    pass the threshold at all; at x10 no top-1 probability reaches 0.5 and every step commits one). A finished row leaves the forward pass, so the row-passes run are the sum of
    the rows' NFE, not batch × steps. Timed against the same decode with every row kept in every
    pass (the forward runs the full batch and drops the finished rows' logits): same tokens."""
    model = _model(vocab, d_model, n_layers, prompt_len + answer_len, head_scale)
    _, x, answer = _prompts(batch, prompt_len, answer_len, vocab, seed=1)
    order, spec = build_order("random"), {"name": "threshold", "tau": tau, "window": block}
    best, res = {}, {}
    for _ in range(repeats):
        for keep_all in (True, False):
            dec = timed_decoder(spec, all_rows=keep_all)
            t0 = time.perf_counter()
            res[keep_all] = (dec.decode(model, order, x, answer), dec.forwards[0])
            best[keep_all] = min(best.get(keep_all, float("inf")), time.perf_counter() - t0)
    (r, fwd), (r_all, fwd_all) = res[False], res[True]
    nfe = r.trace.nfe
    return {"batch": batch, "tau": tau, "window": block, "steps": fwd.calls,
            "nfe_per_row": nfe.tolist(), "row_passes": fwd.row_passes, "row_passes_all_rows": fwd_all.row_passes,
            "seconds": round(best[False], 3), "seconds_all_rows": round(best[True], 3),
            "speedup": round(best[True] / best[False], 3),
            "identical_tokens": bool(torch.equal(r.tokens, r_all.tokens))}


def bench_vs_llada(threads: int = 1, repeats: int = 3) -> Dict[str, object]:
    """Everything above, with ``threads`` torch threads on both sides of every ratio."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return {"threads": threads, "machine": {"torch": torch.__version__, "python": platform.python_version(),
                                                "processor": platform.processor() or platform.machine()},
                "model": {"d_model": 256, "n_layers": 6, "vocab": 8192, "prompt": 32,
                                              "answer": 128, "block": 32, "steps": 128,
                                              "weights": "random init, head x10"},
                # batch 8 takes about 8x as long per decode: best of fewer rounds
                "llada": compare_with_llada(batches=(1,), repeats=repeats)
                + compare_with_llada(batches=(8,), repeats=max(1, repeats // 2)),
                "loop_overhead_126k": loop_overhead(),
                "threshold_rows": threshold_row_passes()}
    finally:
        torch.set_num_threads(prev)
