"""``anyorder bench cache``: what the approximate KV caches (decoding/approx_cache.py) trade.

For every cache option on the ``random`` order (bidirectional: no exact cache skips anything):

- speed: the same greedy semi-AR decode (``top_prob``, one token per step, window 32) of a
  256-token answer after a 32-token prompt, batch 1, on a 6-layer width-256 backbone (random
  init, output head scaled as in ``bench_decode_cache``), timed round-robin against exact
  uncached decoding in the same process (best of ``repeats``, and the median of the ratios within
  each round: this shared host's speed drifts between rounds), the same for the time spent in
  the forward passes alone (the loop's own per-step work -- scores at the window's holes,
  bookkeeping -- is the same for every option and caps the end-to-end ratio), the fraction of
  answer tokens equal to the exact decode's, the ATen operators called per step
  (``aten_calls_per_step``: the per-op work, counted, so unmoved by the host's load) and the cost
  of one full pass against one window pass (``pass_ms``);
- accuracy: a small random-order 4x4 Sudoku model (the demo's, trained in fp32) decodes the
  held-out puzzles with each option; puzzle and cell accuracy, and agreement with exact tokens;
- staleness: which of the dual cache's stale K/V cost it accuracy there -- the dual cache that
  also reruns, every step, the prompt, the answer before the window, or the answer after it.
"""
from __future__ import annotations

import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
from torch.profiler import ProfilerActivity, profile

from .config import load_config, merge
from .decoding import build_decoder
from .decoding.approx_cache import ApproxCachedForward
from .demo import DEMO_CONFIG
from .bench_train import step_clock
from .experiment import evaluate, load_run, train
from .model import ModelConfig, Transformer
from .model.compiled import compiling
from .model.kv_cache import KVCache
from .model.linear import multiplying_by
from .orders import build_order

# (label, decoder options added to the decoder spec); the first is the exact reference
OPTIONS = [("none (exact)", {}),
           ("true (exact KV cache)", {"cache": True}),
           ("prefix", {"cache": "prefix"}),
           ("dual", {"cache": "dual"}),
           ("drift, tol 0.1", {"cache": "drift", "cache_tol": 0.1}),
           ("drift, tol 0.03", {"cache": "drift", "cache_tol": 0.03}),
           ("dual, compiled", {"cache": "dual", "compile": True})]  # last: the indices above stay


def bench_cache_speed(d_model: int = 256, n_layers: int = 6, prompt_len: int = 32, answer_len: int = 256,
                      window: int = 32, vocab: int = 1024, repeats: int = 5, threads: int = 1,
                      head_scale: float = 10.0, batch_size: int = 1, options=None) -> Dict[str, object]:
    """Decode time of every option (``options``: a subset of :data:`OPTIONS`, the exact reference
    first) against exact uncached decoding, interleaved, best of ``repeats`` (and the median of the
    ratios within a round), for ``batch_size``
    rows with different prompts; one torch thread by default (both sides of every ratio use the same
    setting)."""
    options = OPTIONS if options is None else options
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        L = prompt_len + answer_len
        model = Transformer(ModelConfig(vocab_size=vocab + 1, mask_id=vocab, d_model=d_model, n_layers=n_layers,
                                        n_heads=max(1, d_model // 64), max_len=L)).eval()
        with torch.no_grad():  # peaked next-token distributions (see bench.bench_decode_cache)
            model.head.weight.mul_(head_scale)
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, vocab, (int(batch_size), L), generator=gen)
        answer = torch.zeros_like(x, dtype=torch.bool)
        answer[:, prompt_len:] = True
        x = torch.where(answer, torch.full_like(x, vocab), x)
        order = build_order("random")
        spec = {"name": "top_prob", "window": window}
        best: Dict[str, float] = {}
        best_fwd: Dict[str, float] = {}
        rounds: Dict[str, List[float]] = {label: [] for label, _ in options}
        runs: Dict[str, object] = {}
        clock, clock_name = step_clock()  # torch runs on `threads` threads by now
        # a compiled option's first decode compiles (model/compiled.py): once, before the rounds,
        # timed on the wall clock (the compiler runs in other processes)
        first: Dict[str, float] = {}
        for label, opts in options:
            if opts.get("compile"):
                t0 = time.perf_counter()
                build_decoder(dict(spec, **opts)).decode(model, order, x, answer)
                first[label] = round(time.perf_counter() - t0, 1)
        for _ in range(repeats):
            for label, opts in options:
                dec = build_decoder(dict(spec, **opts))
                fwd, spent = _timed_forwards(dec, clock)
                t0 = clock()
                res = dec.decode(model, order, x, answer)
                dt = clock() - t0
                rounds[label].append(dt)
                if dt < best.get(label, float("inf")):
                    best[label], best_fwd[label] = dt, sum(spent)
                runs[label] = (res, fwd[0])
        ref_label = options[0][0]
        ref = runs[ref_label][0]
        rows = []
        for label, opts in options:
            res, fwd = runs[label]
            nfe = int(res.trace.nfe[0])
            calls = aten_calls(lambda: build_decoder(dict(spec, **opts)).decode(model, order, x, answer))
            # the ratio within each round (the exact decode ran moments before), then the median:
            # this host's speed drifts between rounds by more than the best-of-rounds ratio hides
            paired = sorted(e / t for e, t in zip(rounds[ref_label], rounds[label]))
            middle = statistics.median(paired)
            rows.append({"cache": label, "options": opts, "seconds": round(best[label], 3),
                         "speedup_vs_uncached": round(best[ref_label] / best[label], 2),
                         "speedup_median_of_rounds": round(middle, 2),
                         "speedup_rounds": [round(r, 2) for r in paired],
                         "forward_seconds": round(best_fwd[label], 3),
                         "forward_speedup_vs_uncached": round(best_fwd[ref_label] / best_fwd[label], 2),
                         "tokens_per_s": round(int(batch_size) * answer_len / best[label], 1),
                         "agreement_with_exact": round(float((res.tokens == ref.tokens)[answer].float().mean()), 4),
                         "nfe": nfe,
                         "query_tokens_per_step": round(getattr(fwd, "query_tokens", L * nfe) / nfe, 1),
                         "aten_calls_per_step": round(calls / nfe, 1),
                         "refreshes": getattr(fwd, "refreshes", None),
                         **({"first_decode_wall_seconds_with_compile": first[label]} if label in first else {})})
        return {"decoder": spec, "order": "random", "prompt_len": prompt_len, "answer_len": answer_len,
                "pass_ms": pass_times(model, L, prompt_len, window, clock=clock),
                "clock": clock_name,
                "batch_size": int(batch_size), "d_model": d_model, "n_layers": n_layers, "vocab": vocab + 1, "threads": threads,
                "repeats": repeats, "weights": f"random init, head x{head_scale:g}", "results": rows}
    finally:
        torch.set_num_threads(prev_threads)


def aten_calls(run) -> int:
    """How many ATen operators ``run()`` calls from Python (``torch.profiler``; an operator's own
    inner calls not counted): at batch 1 each costs a few microseconds of dispatch whatever its
    size, so this is a decode's per-op work, in a count the host's load does not move."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def pass_times(model, L: int, start: int, window: int, reps: int = 30,
               clock=time.perf_counter) -> Dict[str, Dict[str, float]]:
    """Milliseconds of one full pass (L positions) and of one cached window pass (``window``
    queries over the L-slot cache), each with the output head at half the window (a step reads
    the window's holes: half of it on average), interleaved ``reps`` times: the minimum (the
    machine at its quietest) and the median. What a dual-cache step costs against an uncached one
    (on the random order every query sees every cached slot: no mask, as
    decoding/forward.run_queries passes it). Each also with the weights the approximate caches
    multiply by (model/linear.py: ``[in, out]`` copies, faster for a few rows on CPU), and
    compiled (``torch.compile``: the window pass as ``decoder.compile`` runs it, model/compiled.py;
    the full pass's blocks likewise, to show whether exact decoding would gain from it too)."""
    cache = KVCache(model, 1, L)
    x = torch.zeros(1, L, dtype=torch.long)
    pos = torch.arange(start, start + window).unsqueeze(0)
    read = torch.zeros(1, L, dtype=torch.bool)
    read[0, start:start + window // 2] = True
    copies: Dict[object, torch.Tensor] = {}  # filled by the first pass that uses them, before timing
    full_compiled = torch.compile(model.hidden)

    def window_pass():
        return model.head_logits(model.hidden_cached(x[:, start:start + window], pos, cache, pos, None)[0, :window // 2])

    def compiled_window():
        with compiling():
            return window_pass()

    def full_pass():
        return model.logits_at(x, read)

    # (label, pass, the weight copies it multiplies by), timed in this order, interleaved
    passes = (("full", full_pass, None), ("full, transposed weights", full_pass, copies),
              ("window", window_pass, None), ("window, transposed weights", window_pass, copies),
              ("full, compiled", lambda: model.head_logits(full_compiled(x)[read]), None),
              ("window, compiled", compiled_window, copies))
    times: Dict[str, List[float]] = {name: [] for name, _, _ in passes}
    with torch.no_grad():
        for _, run, weights in passes:  # copies made, kernels compiled: before timing
            with multiplying_by(weights):
                run()
        for _ in range(reps):
            for name, run, weights in passes:
                with multiplying_by(weights):
                    t0 = clock()
                    run()
                    times[name].append(1e3 * (clock() - t0))
    return {k: {"min": round(min(v), 2), "median": round(sorted(v)[len(v) // 2], 2)} for k, v in times.items()}


def _timed_forwards(dec, clock=time.perf_counter):
    """Make ``dec`` keep the forwards it builds and the seconds spent inside them (the rest of a
    decode is the loop's own work: scores, sampling, bookkeeping)."""
    fwd: List[object] = []
    spent: List[float] = []
    make = dec.make_forward

    def made(*args):
        f = make(*args)
        fwd.append(f)

        def timed(x, masked, rows=None, where=None):
            t0 = clock()
            out = f(x, masked, rows, where)
            spent.append(clock() - t0)
            return out

        return timed

    dec.make_forward = made
    return fwd, spent


def sudoku_run(run_dir: str = "runs/bench_cache/sudoku4-random", steps: int = 500) -> Path:
    """The demo's random-order 4x4 Sudoku model, trained in fp32 (reused if already trained)."""
    run = Path(run_dir)
    if not (run / "model.safetensors").exists():
        user = copy.deepcopy(DEMO_CONFIG)
        user["train"].update({"steps": steps, "precision": "fp32"})
        user.update({"order": {"name": "random"}, "name": run.name, "out_dir": str(run.parent)})
        with contextlib.redirect_stdout(sys.stderr):  # the training log must not mix into --json
            train(merge(load_config(None, []), user), run)
    return run


def bench_cache_sudoku(run_dir: str = "runs/bench_cache/sudoku4-random", steps: int = 500, n_eval: int = 500,
                       windows=(4, 8, None), decoder: str = "top_prob", options=None) -> Dict[str, object]:
    """Puzzle accuracy of the held-out puzzles with every cache option (``options``: a subset of
    :data:`OPTIONS`, exact first), per semi-AR window (4 = one grid row of the 16-cell answer, 8 =
    two; None = the whole answer, where the approximate caches keep only the clue cells' K/V
    between refreshes), and the seconds each whole evaluation took (batched, this process's
    threads). ``run_dir`` may be any trained Sudoku run (one without a model is trained here as
    the demo's 4x4 model)."""
    options = OPTIONS if options is None else options
    t0 = time.perf_counter()
    run = sudoku_run(run_dir, steps)
    train_seconds = round(time.perf_counter() - t0, 1)
    exp = load_run(run)
    n = min(n_eval, len(exp.task.eval_p))
    rows = []
    for window in windows:
        spec = {"name": decoder, "window": window}
        ref = None
        for label, opts in options:
            t0 = time.perf_counter()
            res, out = evaluate(exp, dict(spec, **opts), n=n, return_results=True)
            seconds = time.perf_counter() - t0
            ref = out if ref is None else ref
            ans = out.trace.answer
            rows.append({"window": window, "cache": label, "puzzle_acc": round(res["puzzle_acc"], 4),
                         "cell_acc": round(res["cell_acc"], 4),
                         "agreement_with_exact": round(float((out.tokens == ref.tokens)[ans].float().mean()), 4),
                         "seconds": round(seconds, 1)})
    return {"run_dir": str(run), "train_steps": steps, "train_seconds_if_trained": train_seconds,
            "n_eval": n, "decoder": decoder, "threads": torch.get_num_threads(), "results": rows}


# the positions, besides the window, that the dual cache reruns every step: [B, L] from the
# decoder's windows [B, L] (-1 on the prompt) and the current window [B]
RERUN = {"none (dual)": lambda w, cur: torch.zeros_like(w, dtype=torch.bool),
         "prompt": lambda w, cur: w < 0,
         "answer before the window": lambda w, cur: (w >= 0) & (w < cur.unsqueeze(-1)),
         "answer after the window": lambda w, cur: w > cur.unsqueeze(-1),
         "prompt + answer before": lambda w, cur: w < cur.unsqueeze(-1)}


class RerunForward(ApproxCachedForward):
    """The dual cache, with the positions ``rerun(window, current window)`` also run every step
    (their K/V fresh, not as at the window's first step): what staleness there costs."""

    def __init__(self, *args, rerun=None, **kw):
        super().__init__(*args, **kw)
        self.rerun = rerun

    def _recompute(self, x, win):
        return super()._recompute(x, win) | self.rerun(self.window, win)


def bench_cache_staleness(run_dir: str = "runs/bench_cache/sudoku4-random", steps: int = 500, n_eval: int = 500,
                          windows=(4, 8)) -> Dict[str, object]:
    """Puzzle accuracy of the dual cache when one of its stale parts is rerun every step (see
    :data:`RERUN`), per semi-AR window, against exact decoding; the query tokens a step costs."""
    exp = load_run(sudoku_run(run_dir, steps))
    x0, answer = exp.task.eval_set(min(n_eval, len(exp.task.eval_p)))
    prompt = torch.where(answer, torch.full_like(x0, exp.task.mask_id), x0)
    rows = []
    for window in windows:
        ref = None
        for label, rerun in [("exact", None)] + list(RERUN.items()):
            dec = build_decoder({"name": "top_prob", "window": window, "cache": False if rerun is None else "dual"})
            fwd = []
            if rerun is not None:
                def make(model, order, layout, extra, dec=dec, rerun=rerun):
                    fwd.append(RerunForward(model, order, layout, dec.windows(layout), dec.cache_spec, extra,
                                            rerun=rerun))
                    return fwd[-1]
                dec.make_forward = make
            out = dec.decode(exp.model, exp.order, prompt, answer, extra=exp.task.extra(),
                             row_seeds=list(range(len(x0))))
            ref = out if ref is None else ref
            met = exp.task.metrics(out.tokens, x0, answer)
            rows.append({"window": window, "rerun": label, "puzzle_acc": round(met["puzzle_acc"], 4),
                         "agreement_with_exact": round(float((out.tokens == ref.tokens)[answer].float().mean()), 4),
                         "query_tokens_per_step": round(fwd[0].query_tokens / int(out.trace.nfe.sum()), 1) if fwd
                         else float(x0.shape[1])})
    return {"run_dir": run_dir, "n_eval": len(x0), "decoder": "top_prob", "results": rows}
