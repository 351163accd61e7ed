"""Benchmarks (``anyorder bench ...``): measured, not asserted.

- ``train``: tokens/s and achieved FLOP/s of a training step (forward + backward + AdamW) for a
  6-layer, width-256 model at sequence length 128, as a fraction of this machine's measured
  fp32 and bf16 matmul peak (a large square matmul, timed in the same run). FLOPs per step are
  counted by ``torch.utils.flop_counter`` on the real step, not guessed. ``vs_plain_reference``:
  step-time and peak-memory ratios to a plain PyTorch reference step (:mod:`.bench_train`).
- ``decode``: tokens/s, NFE and AFP per decoder on the same backbone (random weights: speed and
  parallelism do not depend on training, except for confidence-driven commit counts), a
  ``cache`` section: exact KV-cached vs uncached decoding (seconds, speed-up, identical tokens),
  an ``approx_cache`` section: the prefix / dual / drift caches' speed-up and agreement with
  exact tokens (``bench cache``, in bench_cache.py, adds their Sudoku accuracy), and ``vs_llada``:
  anyorder's loop against a plain LLaDA decoding loop (bench_decode.py; alone:
  ``anyorder bench decode-llada``).
- ``sudoku-gen``: 100k verified-unique 9×9 puzzles.
"""
from __future__ import annotations

import platform
import time
from typing import Dict

import torch
from torch.utils.flop_counter import FlopCounterMode

from .analysis.flops import register_cpu_attention_flops
from .bench_cache import OPTIONS, bench_cache_speed, bench_cache_staleness, bench_cache_sudoku
from .bench_train import bench_train_vs_reference
from .bench_decode import bench_vs_llada
from .decoding import build_decoder
from .decoding.forward import cached_forward
from .model import ModelConfig, Transformer
from .model.lomdm import LoMDM
from .objectives.lomdm import lomdm_loss
from .objectives.nelbo import plan_loss
from .orders import build_order
from .tasks.sudoku_gen import bench_generation
from .train.optim import build_adamw
from .train.precision import resolve as resolve_precision


def _machine() -> Dict[str, object]:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "python": platform.python_version()}


def matmul_peak(dtype=torch.float32, n: int = 1024, seconds: float = 1.5) -> float:
    """FLOP/s of an n×n @ n×n matmul in ``dtype``, best of repeated timings."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def bench_train(d_model: int = 256, n_layers: int = 6, seq_len: int = 128, batch_size: int = 16,
                steps: int = 6, orders=("random", {"name": "block", "block_size": 16}),
                reference: bool = True) -> Dict[str, object]:
    """The FLOP-rate section runs fp32, and bf16 only where ``precision: auto`` would pick it (an
    emulated bf16 step is ~15x slower and says nothing new); ``vs_plain_reference``: bench_train.py."""
    auto = resolve_precision("auto", torch.device("cpu"))
    precisions = ("fp32", "bf16") if auto["chosen"] == "bf16" else ("fp32",)
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16, seconds=0.3)}
    vocab = 1024
    torch.manual_seed(0)
    results = []
    for order_spec in orders:
        order = build_order(order_spec)
        model = Transformer(ModelConfig(vocab_size=vocab + 1, mask_id=vocab, d_model=d_model, n_layers=n_layers,
                                        n_heads=max(1, d_model // 64), max_len=seq_len))
        opt = build_adamw(list(model.parameters()), 1e-4, (0.9, 0.999), torch.device("cpu"))  # the trainer's
        gen = torch.Generator().manual_seed(0)
        x0 = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
        answer = torch.ones_like(x0, dtype=torch.bool)

        def step(precision):
            plan = order.train_plan(x0, order.layout(answer), vocab, gen)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss, _ = plan_loss(model, plan)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return plan.tokens.numel()

        register_cpu_attention_flops()  # else the CPU attention kernel's FLOPs are not counted
        with FlopCounterMode(display=False) as fc:
            step("fp32")
        flops = fc.get_total_flops()
        for precision in precisions:
            step(precision)  # warm-up
            t0 = time.perf_counter()
            n_tok = sum(step(precision) for _ in range(steps))
            dt = (time.perf_counter() - t0) / steps
            results.append({
                "order": order.name, "precision": precision, "step_seconds": round(dt, 4),
                "tokens_per_s": round(batch_size * seq_len / dt, 1),
                "input_tokens_per_step": n_tok // steps,
                "flops_per_step": flops, "achieved_flops": round(flops / dt),
                "fraction_of_fp32_peak": round(flops / dt / peaks["fp32"], 3),
                "fraction_of_bf16_peak": round(flops / dt / peaks["bf16"], 3),
            })

    lomdm = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in bench_lomdm_ratio(steps=5).items()}
    return {"model": {"d_model": d_model, "n_layers": n_layers, "seq_len": seq_len, "batch_size": batch_size,
                      "params": sum(p.numel() for p in model.parameters())},
            "lomdm_vs_mdlm_step": lomdm, "precision_auto": auto,
            "vs_plain_reference": bench_train_vs_reference() if reference else None,
            "matmul_peak_flops": {k: round(v) for k, v in peaks.items()},
            "bf16_speedup_over_fp32": {r["order"]: round(
                next(x["step_seconds"] for x in results if x["order"] == r["order"] and x["precision"] == "fp32")
                / r["step_seconds"], 2) for r in results if r["precision"] == "bf16"},
            "results": results, "machine": _machine()}


def bench_decode(d_model: int = 256, n_layers: int = 6, seq_len: int = 128, prompt_len: int = 32,
                 batch_size: int = 8) -> Dict[str, object]:
    vocab = 1024
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=vocab + 1, mask_id=vocab, d_model=d_model, n_layers=n_layers,
                                    n_heads=max(1, d_model // 64), max_len=seq_len)).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
    answer = torch.zeros_like(x, dtype=torch.bool)
    answer[:, prompt_len:] = True
    x = torch.where(answer, torch.full_like(x, vocab), x)
    n_answer = seq_len - prompt_len
    cases = [("random", {"name": "top_prob"}), ("random", {"name": "margin"}), ("random", {"name": "entropy"}),
             ("random", {"name": "random"}), ("random", {"name": "left_to_right"}),
             ("random", {"name": "top_prob", "k": 4}), ("random", {"name": "top_prob", "steps": n_answer // 8, "window": 32}),
             ("random", {"name": "top_prob", "temperature": 1.0, "top_p": 0.9}),
             ("ar", {"name": "left_to_right"}), ({"name": "block", "block_size": 8}, {"name": "top_prob"}),
             ({"name": "block", "block_size": 8}, {"name": "top_prob", "k": 2})]
    rows = []
    for order_spec, dec_spec in cases:
        order = build_order(order_spec)
        dec = build_decoder(dict(dec_spec))
        t0 = time.perf_counter()
        r = dec.decode(model, order, x, answer)
        dt = time.perf_counter() - t0
        s = r.trace.summary()
        rows.append({"order": order.name, "decoder": dec_spec, "tokens_per_s": round(batch_size * n_answer / dt, 1),
                     "nfe": s["nfe"], "afp": round(s["afp"], 3), "kendall_tau": round(s["kendall_tau"], 3),
                     "seconds": round(dt, 3)})
    return {"model": {"d_model": d_model, "n_layers": n_layers, "seq_len": seq_len, "answer_len": n_answer,
                      "batch_size": batch_size, "weights": "random init"}, "results": rows,
            "cache": bench_decode_cache(d_model, n_layers),
            "approx_cache": bench_cache_speed(d_model, n_layers, repeats=3),  # anyorder bench cache: + Sudoku accuracy
            "vs_llada": bench_vs_llada(), "machine": _machine()}


def bench_decode_cache(d_model: int = 256, n_layers: int = 6, prompt_len: int = 16,
                       cases=(({"name": "block", "block_size": 8}, {"name": "top_prob", "k": 2}, 512),
                              ("ar", {"name": "left_to_right"}, 256)),
                       threads: int = 1, head_scale: float = 10.0) -> Dict[str, object]:
    """Exact KV cache vs the full pass: the same greedy decode (batch 1) with ``cache`` off and on.

    Block diffusion commits k=2 tokens per step over a 512-token answer and AR one token per step
    over a 256-token answer, to keep the uncached runs short. Timed with ``threads`` torch threads
    (1 by default: the cached steps run 2-16 query rows, too small to gain from a second thread,
    and on a shared machine a busy second core slows small multi-threaded matmuls down a lot);
    both sides of every ratio use the same setting. Measured timings: ``docs/kv_cache.md``.

    The output head of the random-init backbone is scaled by ``head_scale`` (logit std 0.3 -> 3.2,
    mean top-1 probability 0.003 -> 0.32, like a trained model). Unscaled, the distributions over
    1024 tokens are so flat that two tokens' logits often differ by less than float32 rounding
    (1e-7), and which one wins then depends on the matmul shape, cached or not (measured: a
    greedy block decode diverged at step 79 on a top-2 logit gap below 1e-6). The compute timed
    is the same either way.
    """
    vocab = 1024
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        max_len = prompt_len + max(n for _, _, n in cases)
        model = Transformer(ModelConfig(vocab_size=vocab + 1, mask_id=vocab, d_model=d_model, n_layers=n_layers,
                                        n_heads=max(1, d_model // 64), max_len=max_len)).eval()
        with torch.no_grad():  # peaked next-token distributions, see the docstring
            model.head.weight.mul_(head_scale)
        gen = torch.Generator().manual_seed(0)
        rows = []
        for order_spec, dec_spec, n_answer in cases:
            L = prompt_len + n_answer
            x = torch.randint(0, vocab, (1, L), generator=gen)
            answer = torch.zeros_like(x, dtype=torch.bool)
            answer[:, prompt_len:] = True
            x = torch.where(answer, torch.full_like(x, vocab), x)
            order = build_order(order_spec)
            runs, forwards = {}, []
            for cache in (False, True):
                dec = build_decoder(dict(dec_spec, cache=cache))
                if cache:  # keep the forward to read how many query tokens it ran
                    dec.make_forward = lambda *a: forwards.append(cached_forward(*a)) or forwards[-1]
                t0 = time.perf_counter()
                runs[cache] = (dec.decode(model, order, x, answer), time.perf_counter() - t0)
            (ru, tu), (rc, tc) = runs[False], runs[True]
            nfe = int(rc.trace.nfe[0])
            rows.append({"order": order.name, "block_size": order.block_size, "decoder": dec_spec,
                         "prompt_len": prompt_len, "answer_len": n_answer, "batch_size": 1, "nfe": nfe,
                         "uncached_seconds": round(tu, 3), "cached_seconds": round(tc, 3),
                         "speedup": round(tu / tc, 2),
                         "identical_tokens": bool(torch.equal(ru.tokens, rc.tokens)),
                         "identical_trace": bool(torch.equal(ru.trace.finalize_step, rc.trace.finalize_step)),
                         "query_tokens_per_step": {"uncached": L,
                                                   "cached": round(forwards[0].query_tokens / nfe, 2)}})
        return {"threads": threads, "d_model": d_model, "n_layers": n_layers,
                "weights": f"random init, head x{head_scale:g}", "results": rows}
    finally:
        torch.set_num_threads(prev_threads)


def bench_cache() -> Dict[str, object]:
    """``anyorder bench cache``: the approximate KV caches' speed-up and agreement with exact
    tokens, their puzzle accuracy on a small trained Sudoku model and which stale part costs it
    (bench_cache.py)."""
    # the same decode on a backbone twice as wide (8 heads): exact vs dual (eager, compiled) only
    wide = bench_cache_speed(d_model=512, options=[OPTIONS[0], OPTIONS[3], OPTIONS[6]])
    return {"speed": bench_cache_speed(), "speed_width_512": wide, "sudoku": bench_cache_sudoku(),
            "staleness": bench_cache_staleness(), "machine": _machine()}


def bench_sudoku_gen(count: int = 100_000) -> Dict[str, object]:
    return {**bench_generation(size=9, count=count, n_clues=30, seed=0), "machine": _machine()}


def bench_lomdm_ratio(n_layers: int = 4, d_model: int = 128, batch: int = 32, length: int = 64,
                      vocab: int = 64, steps: int = 3, warmup: int = 1, seed: int = 0) -> Dict[str, float]:
    """Seconds per training step (forward + backward + AdamW) of LoMDM and of an MDLM step of
    the same backbone, in this process (a plain AdamW loop: only the step's cost matters)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab + 1, mask_id=vocab, d_model=d_model, n_layers=n_layers,
                      n_heads=max(1, d_model // 32), max_len=length)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, vocab, (batch, length), generator=g)
    answer = torch.ones(batch, length, dtype=torch.bool)
    mdlm_model = Transformer(cfg)
    lomdm = LoMDM(Transformer(cfg))
    order = build_order("random")
    layout = order.layout(answer)

    def mdlm_step(gen):
        plan = order.train_plan(x0, layout, cfg.mask_id, gen)
        return plan_loss(mdlm_model, plan)[0]

    def lomdm_step(gen):
        return lomdm_loss(lomdm, x0, answer, gen)[0]

    def timed(model, fn):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        times = []
        for i in range(warmup + steps):
            gen = torch.Generator().manual_seed(i)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            fn(gen).backward()
            opt.step()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        return min(times)  # least disturbed by other processes on a shared machine

    s_mdlm = timed(mdlm_model, mdlm_step)
    s_lomdm = timed(lomdm, lomdm_step)
    return {"mdlm_s_per_step": s_mdlm, "lomdm_s_per_step": s_lomdm, "ratio": s_lomdm / s_mdlm,
            "n_layers": n_layers, "d_model": d_model, "batch": batch, "length": length}
