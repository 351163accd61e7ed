"""``anyorder`` command line: a thin layer over the Python API.

    anyorder train CONFIG.yaml [key=value ...]     train (resumes if the run dir has a checkpoint)
    anyorder eval RUN_DIR [--decoder NAME ...]     task metrics + AFP / Kendall τ / NFE per decoder
    anyorder sample RUN_DIR [--decoder NAME] ...   decode prompts (or puzzle strings) and print them
    anyorder orders [--json] | decoders [--json]   registered names
    anyorder toy [--json]                          seed 004's marginals-vs-joint toy
    anyorder demo                                  three orders × several decoders on 4×4 Sudoku
    anyorder bench {train,decode,sudoku-gen} [--json]
    anyorder likelihood RUN_DIR [--samples N] [--split test|zero_shot] [--json]   NELBO / PPL bound (exact for AR)
    anyorder analyze RUN_DIR [--decoder NAME ...] [--n N] [--out DIR]   seed 003/004 diagnostics report
    anyorder zipf --s 1.05 --vocab 150000 --max-parallel 8 [--json]     seed 004's independence-PPL table
    anyorder sweep SWEEP.yaml [--workers N] [--launcher local|submitit]  a grid of runs (resumable)
    anyorder report SWEEP_DIR [--out DIR]          curves with seed bands, FLOPs to threshold, affinity
    anyorder text-compare RUN_DIR... --judge AR_RUN --out DIR   text runs: PPL bounds, gen PPL, unigram entropy
    anyorder estimate SWEEP.yaml ... [--steps N] [--gpu-peak TFLOPS] [--mfu 0.4] [--json]   FLOPs and GPU hours
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _decoder_spec(args) -> dict:
    spec = {"name": args.decoder}
    for key in ("k", "steps", "block_size", "temperature", "top_k", "top_p", "seed"):
        val = getattr(args, key, None)
        if val is not None:
            spec[key] = val
    for item in getattr(args, "opt", None) or []:  # --opt tau=0.8 --opt fill_tokens=[1,2,3,4]
        import yaml

        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--opt expects key=value, got {item!r}")
        spec[key.strip()] = yaml.safe_load(val)
    return spec


def _add_decoder_args(p):
    p.add_argument("--decoder", default=None, help="decoder name (see `anyorder decoders`)")
    p.add_argument("--k", type=int, default=None, help="tokens committed per step")
    p.add_argument("--steps", type=int, default=None, help="total decoding steps (LLaDA's even split)")
    p.add_argument("--block-size", dest="block_size", type=int, default=None, help="semi-AR block length")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", dest="top_k", type=int, default=None)
    p.add_argument("--top-p", dest="top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--opt", action="append", default=None, metavar="KEY=VALUE",
                   help="any other decoder option, e.g. --opt tau=0.8 (repeatable; values parsed as YAML)")


def cmd_train(args):
    from .config import load_config
    from .experiment import train

    cfg = load_config(args.config, args.overrides)
    run_dir = train(cfg)
    print(f"run directory: {run_dir}")


def cmd_eval(args):
    from .experiment import evaluate, load_run

    exp = load_run(args.run_dir)
    specs = [_decoder_spec(args)] if args.decoder else exp.cfg["decode"]
    rows = []
    for spec in specs:
        res = evaluate(exp, spec, n=args.n or int(exp.cfg["eval"]["n"]))
        rows.append({"decoder": spec, **res})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        from .analysis.table import format_table
        print(format_table(rows, exp.task.headline()))


def cmd_sample(args):
    import torch

    from .experiment import load_run, run_decoder

    exp = load_run(args.run_dir)
    spec = _decoder_spec(args) if args.decoder else exp.cfg["decode"][0]
    if args.puzzle:
        if not hasattr(exp.task, "parse"):
            raise ValueError(f"task {exp.task.name!r} does not take --puzzle strings")
        x = torch.stack([exp.task.parse(s) for s in args.puzzle])
        answer = x == exp.task.mask_id
        x0 = x.clone()
    else:
        x0, answer = exp.task.eval_set(args.n)
    res, out = run_decoder(exp.model, exp, spec, x0, answer, return_results=True)
    for row, steps in zip(out.tokens.tolist(), out.trace.finalize_step.tolist()):
        print(" ".join(map(str, row)))
    if not args.puzzle:
        print(json.dumps(res, indent=1))


def cmd_likelihood(args):
    from .evaluation.likelihood import likelihood_of_run
    from .experiment import load_run

    res = likelihood_of_run(load_run(args.run_dir), split=args.split, samples=args.samples, n=args.n,
                            batch_size=args.batch_size, seed=args.seed)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{res['order']} on {res['task']} / {res['split']}: {res['sequences']} sequences, {res['tokens']} tokens, "
              f"{res['samples']} sample(s)")
        print(f"  {res['bound']}: {res['nelbo_per_token']:.4f} nats/token (± {res['stderr']:.4f} s.e.)")
        le = "PPL" if res["bound"] == "exact NLL" else "PPL <="
        print(f"  {le} {res['ppl']:.2f}   (±2 s.e.: {res['ppl_low']:.2f} .. {res['ppl_high']:.2f})")


def cmd_list(registry, as_json: bool):
    names = registry.names()
    print(json.dumps(names) if as_json else "\n".join(names))


def cmd_toy(args):
    from .studies.toy import run_toy

    res = run_toy(steps=args.steps, seed=args.seed)
    if args.json:
        print(json.dumps(res))
    else:
        d = res["data"]
        print(f"model (trained {res['train_seconds']} s) vs data, given  _ _ C D _")
        print(f"  P(A)      {res['p_A']:.3f}   data {d['p_A']:.2f}")
        print(f"  P(B)      {res['p_B']:.3f}   data {d['p_B']:.2f}")
        print(f"  P(A,B)    {res['joint_AB']:.3f}   data {d['joint_AB']:.2f}")
        key = "joint_A'B"
        print(f"  P(A',B)   {res[key]:.3f}   data {d[key]:.2f}")
        print(f"  committing both at once picks {res['parallel_pick']}; the joint mode is {res['joint_mode']}")


def cmd_demo(args):
    from .demo import run_demo

    run_demo(out_dir=args.out_dir, steps=args.steps, quick=args.quick)


def cmd_bench(args):
    from . import bench

    res = {"train": bench.bench_train, "decode": bench.bench_decode, "sudoku-gen": bench.bench_sudoku_gen}[args.what]()
    print(json.dumps(res, indent=None if args.json else 1))


def cmd_analyze(args):
    from .analysis.report import analyze_run

    specs = [_decoder_spec(args)] if args.decoder else None
    out = args.out or f"{args.run_dir.rstrip('/')}/analysis"
    res = analyze_run(args.run_dir, decoders=specs, n=args.n, out=out, s=args.s, vocab=args.vocab,
                      far=args.far, max_parallel=args.max_parallel)
    print(f"report: {out}/report.md")
    if args.json:
        print(json.dumps({"zipf": {k: res["zipf"][k] for k in ("s", "vocab", "s_fit", "fit_rmse")},
                          "homogenisation": res["distance"]["homogenisation"],
                          "decoders": {k: e["split"]["all"] for k, e in res["decoders"].items()}}))


def cmd_zipf(args):
    from .analysis.zipf import ppl_table

    res = ppl_table(args.s, args.vocab, args.max_parallel)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"independence PPL of n tokens committed at once, Zipf bound s={args.s:g}, N={args.vocab}")
        print(" n   P_n       PPL(n)    seed table")
        seed = res["seed_table"] + [None] * len(res["ppl"])
        for i, (p, v) in enumerate(zip(res["p_n"], res["ppl"])):
            print(f"{i + 1:2d}   {p:.6f}  {v:8.4f}  {'' if seed[i] is None else seed[i]}")
        print(res["note"])


def cmd_estimate(args):
    from .studies.estimate import H100_BF16_DENSE_TFLOPS, DEFAULT_MFU, estimate_sweeps, format_estimate

    res = estimate_sweeps(args.sweeps, cpu_steps=args.steps, max_data=args.max_data,
                          peak_tflops=H100_BF16_DENSE_TFLOPS if args.gpu_peak is None else args.gpu_peak,
                          mfu=DEFAULT_MFU if args.mfu is None else args.mfu,
                          log=None if args.json else (lambda s: print(s, file=sys.stderr, flush=True)))
    print(json.dumps(res, indent=1) if args.json else format_estimate(res))


def main(argv: Optional[List[str]] = None) -> int:
    from .decoding import DECODERS
    from .orders import ORDERS

    p = argparse.ArgumentParser(prog="anyorder", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=200")
    e = sub.add_parser("eval", help="decode the evaluation set and measure")
    e.add_argument("run_dir")
    e.add_argument("--n", type=int, default=None)
    e.add_argument("--json", action="store_true")
    _add_decoder_args(e)
    s = sub.add_parser("sample", help="decode and print")
    s.add_argument("run_dir")
    s.add_argument("--n", type=int, default=4)
    s.add_argument("--puzzle", action="append", help="a puzzle string (Sudoku), may repeat")
    _add_decoder_args(s)
    for name in ("orders", "decoders"):
        q = sub.add_parser(name, help=f"list registered {name}")
        q.add_argument("--json", action="store_true")
    q = sub.add_parser("toy", help="seed 004's marginals-vs-joint toy")
    q.add_argument("--json", action="store_true")
    q.add_argument("--steps", type=int, default=None)
    q.add_argument("--seed", type=int, default=0)
    d = sub.add_parser("demo", help="train 3 orders on 4x4 Sudoku, decode with several policies, print a table")
    d.add_argument("--out-dir", default="runs/demo")
    d.add_argument("--steps", type=int, default=None)
    d.add_argument("--quick", action="store_true", help="a few steps only (smoke run)")
    b = sub.add_parser("bench", help="benchmarks")
    b.add_argument("what", choices=["train", "decode", "sudoku-gen"])
    b.add_argument("--json", action="store_true")
    an = sub.add_parser("analyze", help="seed 003/004 diagnostics of a run: report.md + PNGs + results.json")
    an.add_argument("run_dir")
    an.add_argument("--n", type=int, default=256, help="evaluation rows")
    an.add_argument("--out", default=None, help="output folder (default RUN_DIR/analysis)")
    an.add_argument("--s", type=float, default=1.05, help="Zipf exponent of the plotted bound")
    an.add_argument("--vocab", type=int, default=None, help="Zipf N (default: distinct answer tokens)")
    an.add_argument("--far", type=int, default=4, help="distance from which masks count as distant")
    an.add_argument("--max-parallel", dest="max_parallel", type=int, default=8)
    an.add_argument("--json", action="store_true", help="also print the key numbers as JSON")
    _add_decoder_args(an)
    z = sub.add_parser("zipf", help="seed 004's Zipf bound and independence-PPL table")
    z.add_argument("--s", type=float, default=1.05)
    z.add_argument("--vocab", type=int, default=150000)
    z.add_argument("--max-parallel", dest="max_parallel", type=int, default=8)
    z.add_argument("--json", action="store_true")
    lk = sub.add_parser("likelihood", help="NELBO / perplexity bound of a run (exact NLL for AR)")
    lk.add_argument("run_dir")
    lk.add_argument("--samples", type=int, default=8, help="Monte-Carlo replicates (t and masks)")
    lk.add_argument("--split", default="test", help="train | validation | test | zero_shot (text tasks)")
    lk.add_argument("--n", type=int, default=None, help="rows (spread over the split); default all")
    lk.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    lk.add_argument("--seed", type=int, default=0)
    lk.add_argument("--json", action="store_true")
    sw = sub.add_parser("sweep", help="train a grid of runs (orders x tasks x seeds ...); finished runs are skipped")
    sw.add_argument("config")
    sw.add_argument("--workers", type=int, default=None)
    sw.add_argument("--launcher", choices=["local", "submitit"], default=None)
    rp = sub.add_parser("report", help="training-stability report of a sweep directory")
    rp.add_argument("sweep_dir")
    rp.add_argument("--out", default=None, help="write report.md, report.json and PNGs here (default: SWEEP_DIR)")
    es = sub.add_parser("estimate", help="FLOPs per step (counted on the CPU) and GPU hours of a sweep")
    es.add_argument("sweeps", nargs="+", metavar="SWEEP.yaml")
    es.add_argument("--steps", type=int, default=2, help="real CPU training steps per distinct config (0: count only)")
    es.add_argument("--gpu-peak", dest="gpu_peak", type=float, default=None,
                    help="GPU peak TFLOP/s (default 989: H100 SXM dense BF16)")
    es.add_argument("--mfu", type=float, default=None, help="assumed model-FLOPs utilisation (default 0.4)")
    es.add_argument("--max-data", dest="max_data", type=int, default=4096,
                    help="cap task.n_train / n_eval while building (FLOPs do not depend on it; 0: no cap)")
    es.add_argument("--json", action="store_true")
    from .studies.text_compare import add_arguments as add_text_compare_arguments
    tc = sub.add_parser("text-compare", help="compare text runs: test / zero-shot PPL, gen PPL judged by an AR run, "
                                             "unigram entropy, LoMDM velocity plots")
    add_text_compare_arguments(tc)
    args = p.parse_args(argv)
    try:
        if args.cmd == "train":
            cmd_train(args)
        elif args.cmd == "eval":
            cmd_eval(args)
        elif args.cmd == "sample":
            cmd_sample(args)
        elif args.cmd == "orders":
            cmd_list(ORDERS, args.json)
        elif args.cmd == "decoders":
            cmd_list(DECODERS, args.json)
        elif args.cmd == "toy":
            if args.steps is None:
                from .studies.toy import DEFAULT_STEPS
                args.steps = DEFAULT_STEPS
            cmd_toy(args)
        elif args.cmd == "demo":
            cmd_demo(args)
        elif args.cmd == "bench":
            cmd_bench(args)
        elif args.cmd == "likelihood":
            cmd_likelihood(args)
        elif args.cmd == "analyze":
            cmd_analyze(args)
        elif args.cmd == "zipf":
            cmd_zipf(args)
        elif args.cmd == "sweep":
            from .sweep import run_sweep
            for r in run_sweep(args.config, workers=args.workers, launcher=args.launcher):
                print(f"{r['status']:>15}  {r['run']}")
        elif args.cmd == "text-compare":
            from .studies.text_compare import run_from_args
            run_from_args(args)
        elif args.cmd == "report":
            from .studies.sweep_report import write_report
            print(f"report: {write_report(args.sweep_dir, out_dir=args.out)}")
        elif args.cmd == "estimate":
            cmd_estimate(args)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"anyorder: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
