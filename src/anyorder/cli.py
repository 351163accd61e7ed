"""``anyorder`` command line: a thin layer over the Python API.

    anyorder train CONFIG.yaml [key=value ...]     train (resumes if the run dir has a checkpoint)
    anyorder eval RUN_DIR [--decoder NAME ...]     task metrics + AFP / Kendall τ / NFE per decoder
    anyorder sample RUN_DIR [--decoder NAME] ...   decode prompts (or puzzle strings) and print them
    anyorder generate --model DIR --prompt TEXT [--order ORDER --decoder NAME --json]   decode a HF model directory
    anyorder export RUN_DIR --out DIR              an hf-backbone run as a HF directory (LoRA merged, anyorder.json)
    anyorder orders [--json] | decoders [--json]   registered names
    anyorder toy [--json]                          the A/B toy: marginals are not the joint
    anyorder demo                                  three orders × several decoders on 4×4 Sudoku
    anyorder bench {train,decode,decode-llada,sudoku-gen,cache} [--json]
    anyorder likelihood RUN_DIR [--samples N] [--split test|zero_shot] [--json]   NELBO / PPL bound (exact for AR)
    anyorder analyze RUN_DIR [--decoder NAME ...] [--n N] [--out DIR]   decoding diagnostics report
    anyorder zipf --s 1.05 --vocab 150000 --max-parallel 8 [--json]     Zipf bound, independence-PPL table
    anyorder sweep SWEEP.yaml [--workers N] [--launcher local|submitit]  a grid of runs (resumable)
    anyorder report SWEEP_DIR [--out DIR]          curves with seed bands, FLOPs to threshold, affinity
    anyorder text-compare RUN_DIR... --judge AR_RUN --out DIR   text runs: PPL bounds, gen PPL, unigram entropy
    anyorder estimate SWEEP.yaml ... [--steps N] [--gpu-peak TFLOPS] [--mfu 0.4] [--json]   FLOPs and GPU hours
    anyorder view PATH... [--decoder NAME ...] [--n N] [--out view.html]   step-by-step trace viewer (one HTML file)
    anyorder serve RUN_DIR [--port 8765]           live decoding page on 127.0.0.1

The toy and the Zipf table are those of "Why mask diffusion does not work"; ``analyze`` adds the
AFP / Kendall τ statistics of "Parallelism and Generation Order in Masked Diffusion Language
Models: Limits Today, Potential Tomorrow"; ``report`` is the training-stability study of "On the
Trainability of Masked Diffusion Language Models via Blockwise Locality" (2026). The study
commands live in :mod:`anyorder.studies`.

Every subcommand sets its handler (``func``); a user error (a bad value, a missing file) prints
one line and exits with status 2, any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from .threads import quiet_openmp, set_threads

quiet_openmp()  # before torch loads OpenMP: idle threads sleep instead of spinning (threads.py)

import torch  # noqa: E402
import yaml  # noqa: E402

from . import bench
from .bench_decode import bench_vs_llada
from .analysis.report import analyze_run
from .analysis.table import format_table
from .analysis.zipf import ppl_table
from .config import load_config, read_yaml
from .decoding import DECODERS, build_decoder
from .demo import run_demo
from .evaluation.likelihood import likelihood_of_run
from .adapters import hf_export, hf_generate
from .experiment import evaluate, load_run, run_decoder, train
from .orders import ORDERS
from .plugins import allowed
from .studies import estimate, sweep_report, text_compare, toy
from .sweep import SweepStopped, run_sweep
from .viewer import server as viewer_server, view as viewer_view

USER_ERRORS = (ValueError, FileNotFoundError)
DECODER_OPTIONS = ("k", "steps", "window", "temperature", "top_k", "top_p", "seed")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: a bad argument is a user error like any other."""

    def error(self, message):
        raise ValueError(f"{self.prog}: {message} (see {self.prog} --help)")


def count(text: str) -> int:
    """An argparse type: an integer >= 1 (``--n 0`` or ``--n -5`` is an error, not a default)."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _decoder_spec(args) -> dict:
    spec = {"name": args.decoder}
    for key in DECODER_OPTIONS:
        val = getattr(args, key, None)
        if val is not None:
            spec[key] = val
    for item in getattr(args, "opt", None) or []:  # --opt tau=0.8 --opt fill_tokens=[1,2,3,4]
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--opt expects key=value, got {item!r}")
        spec[key.strip()] = read_yaml(val, f"--opt {item!r}")
    if args.decoder is None and len(spec) > 1:  # options of no decoder would be silently dropped
        raise ValueError(f"decoder options ({', '.join(sorted(set(spec) - {'name'}))}) need --decoder NAME")
    return spec


def _module_command(sub, name: str, help: str, module) -> None:
    """A subcommand whose module brings its own arguments (``add_arguments``) and handler (``run_from_args``)."""
    parser = sub.add_parser(name, help=help)
    module.add_arguments(parser)
    parser.set_defaults(func=module.run_from_args)


def _add_decoder_args(p):
    p.add_argument("--decoder", default=None, help="decoder name (see `anyorder decoders`)")
    p.add_argument("--k", type=int, default=None, help="tokens committed per step")
    p.add_argument("--steps", type=int, default=None, help="total decoding steps (LLaDA's even split)")
    p.add_argument("--window", type=int, default=None, help="semi-AR window length (LLaDA's block_length)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", dest="top_k", type=int, default=None)
    p.add_argument("--top-p", dest="top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--opt", action="append", default=None, metavar="KEY=VALUE",
                   help="any other decoder option, e.g. --opt tau=0.8 (repeatable; values parsed as YAML)")


def cmd_train(args):
    cfg = load_config(args.config, args.overrides)
    run_dir = train(cfg, config_dir=Path(args.config).parent)  # its plugins: relative to the config file
    print(f"run directory: {run_dir}")


def cmd_eval(args):
    spec = _decoder_spec(args)  # checked before the run is loaded
    exp = load_run(args.run_dir)
    specs = [spec] if args.decoder else exp.cfg["decode"]
    n = args.n or int(exp.cfg["eval"]["n"])
    if args.puzzles:  # the file replaces the held-out set: all of it unless --n says fewer
        n = min(args.n or 10 ** 12, exp.task.load_eval(args.puzzles))
    rows = []
    for spec in specs:
        res = evaluate(exp, spec, n=n)
        rows.append({"decoder": spec, **res})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows, exp.task.headline()))


def _parse_puzzle(task, text: str):
    try:
        return task.parse(text)
    except ValueError as exc:
        raise ValueError(f"--puzzle {text!r}: {exc}") from None


def cmd_sample(args):
    spec = _decoder_spec(args)
    exp = load_run(args.run_dir)
    spec = spec if args.decoder else exp.cfg["decode"][0]
    build_decoder(spec)  # a bad decoder option is the error, before any warning about the input
    if args.puzzle:
        if not hasattr(exp.task, "parse"):
            raise ValueError(f"task {exp.task.name!r} does not take --puzzle strings")
        x = torch.stack([_parse_puzzle(exp.task, s) for s in args.puzzle])
        for i, s in enumerate(args.puzzle):  # decoded all the same: what the model does there may be the question
            problem = exp.task.check_puzzle(s) if hasattr(exp.task, "check_puzzle") else None
            if problem:
                print(f"anyorder: warning: puzzle {i + 1} ({''.join(s.split())}) {problem}", file=sys.stderr)
        answer = x == exp.task.mask_id
        x0 = x.clone()
    else:
        x0, answer = exp.task.eval_set(args.n)
    res, out = run_decoder(exp.model, exp, spec, x0, answer, return_results=True)
    for row in out.tokens.tolist():
        print(" ".join(map(str, row)))
    if not args.puzzle:
        print(json.dumps(res, indent=1))


def cmd_likelihood(args):
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


def cmd_demo(args):
    run_demo(out_dir=args.out_dir, steps=args.steps, quick=args.quick)


def cmd_selfcheck(args):
    from .selfcheck import run_selfcheck  # lazy: trains every order
    if not run_selfcheck(args.out_dir, tiny=args.tiny, orders=args.orders)["ok"]:
        raise SystemExit(1)


def cmd_bench(args):
    res = {"train": bench.bench_train, "decode": bench.bench_decode, "sudoku-gen": bench.bench_sudoku_gen,
           "decode-llada": bench_vs_llada, "cache": bench.bench_cache}[args.what]()
    print(json.dumps(res, indent=None if args.json else 1))


def cmd_analyze(args):
    spec = _decoder_spec(args)
    specs = [spec] if args.decoder else None
    out = args.out or f"{args.run_dir.rstrip('/')}/analysis"
    res = analyze_run(args.run_dir, decoders=specs, n=args.n, out=out, s=args.s, vocab=args.vocab,
                      far=args.far, max_parallel=args.max_parallel)
    print(f"report: {out}/report.md")
    if args.json:
        print(json.dumps({"zipf": {k: res["zipf"][k] for k in ("s", "vocab", "s_fit", "fit_rmse")},
                          "homogenisation": res["distance"]["homogenisation"],
                          "decoders": {k: e["split"]["all"] for k, e in res["decoders"].items()}}))


def cmd_zipf(args):
    res = ppl_table(args.s, args.vocab, args.max_parallel)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"independence PPL of n tokens committed at once, Zipf bound s={args.s:g}, N={args.vocab}")
        print(" n   P_n       PPL(n)    paper's table")
        paper = res["seed_table"] + [None] * len(res["ppl"])
        for i, (p, v) in enumerate(zip(res["p_n"], res["ppl"])):
            print(f"{i + 1:2d}   {p:.6f}  {v:8.4f}  {'' if paper[i] is None else paper[i]}")
        print(res["note"])


def cmd_sweep(args):
    try:
        results = run_sweep(args.config, workers=args.workers, launcher=args.launcher, force=args.force)
    except KeyboardInterrupt as exc:  # Ctrl-C: one line (a stopped pool of workers has said it), no traceback
        if not isinstance(exc, SweepStopped):
            print("anyorder: sweep interrupted (rerun the sweep to resume)", file=sys.stderr)
        raise SystemExit(130)
    for r in results:
        print(f"{r['status']:>15}  {r['run']}")


def cmd_view(args):
    spec = _decoder_spec(args)
    viewer_view.run_from_args(args, [spec] if args.decoder else None)


def cmd_names(registry):
    def run(args):
        names = registry.names()
        print(json.dumps(names) if args.json else "\n".join(names))
    return run


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="anyorder", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=200")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="decode the evaluation set and measure")
    e.add_argument("run_dir")
    e.add_argument("--n", type=count, default=None, help="evaluation rows (default: the config's eval.n)")
    e.add_argument("--json", action="store_true")
    e.add_argument("--puzzles", metavar="FILE", default=None,
                   help="evaluate on the puzzles in FILE instead (one per line, n*n characters, optional ',solution')")
    _add_decoder_args(e)
    e.set_defaults(func=cmd_eval)
    s = sub.add_parser("sample", help="decode and print")
    s.add_argument("run_dir")
    s.add_argument("--n", type=count, default=4)
    s.add_argument("--puzzle", action="append", help="a puzzle string (Sudoku) or a text prompt, may repeat")
    _add_decoder_args(s)
    s.set_defaults(func=cmd_sample)
    _module_command(sub, "generate", "decode a local Hugging Face model directory under any order and decoder", hf_generate)
    _module_command(sub, "export", "write an hf-backbone run as a Hugging Face directory (LoRA merged)", hf_export)
    for name, registry in (("orders", ORDERS), ("decoders", DECODERS)):
        q = sub.add_parser(name, help=f"list registered {name}")
        q.add_argument("--json", action="store_true")
        q.set_defaults(func=cmd_names(registry))
    _module_command(sub, "toy", "the A/B toy: committing two tokens at once picks the wrong pair", toy)
    d = sub.add_parser("demo", help="train 3 orders on 4x4 Sudoku, decode with several policies, print a table")
    d.add_argument("--out-dir", default="runs/demo")
    d.add_argument("--steps", type=int, default=None)
    d.add_argument("--quick", action="store_true", help="a few steps only (smoke run)")
    d.set_defaults(func=cmd_demo)
    sc = sub.add_parser("selfcheck", help="train every order in bf16 (and FSDP2 on one rank), compare cached with "
                                          "uncached decoding, report tokens/s and peak memory (< 8 min on one GPU)")
    sc.add_argument("--out-dir", default="runs/selfcheck")
    sc.add_argument("--tiny", action="store_true", help="tiny sizes: the whole check in seconds on a CPU")
    sc.add_argument("--orders", nargs="+", default=None, help="only these orders (default: every registered one)")
    sc.set_defaults(func=cmd_selfcheck)
    b = sub.add_parser("bench", help="benchmarks")
    b.add_argument("what", choices=["train", "decode", "decode-llada", "sudoku-gen", "cache"])
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)
    an = sub.add_parser("analyze", help="decoding diagnostics of a run (AFP / τ, distance, Zipf, factorisation "
                                        "gap): report.md + PNGs + results.json")
    an.add_argument("run_dir")
    an.add_argument("--n", type=count, default=256, help="evaluation rows")
    an.add_argument("--out", default=None, help="output folder (default RUN_DIR/analysis)")
    an.add_argument("--s", type=float, default=1.05, help="Zipf exponent of the plotted bound")
    an.add_argument("--vocab", type=int, default=None, help="Zipf N (default: distinct answer tokens)")
    an.add_argument("--far", type=int, default=4, help="distance from which masks count as distant")
    an.add_argument("--max-parallel", dest="max_parallel", type=int, default=8)
    an.add_argument("--json", action="store_true", help="also print the key numbers as JSON")
    _add_decoder_args(an)
    an.set_defaults(func=cmd_analyze)
    z = sub.add_parser("zipf", help="the Zipf bound and independence-PPL table of 'Why mask diffusion does not work'")
    z.add_argument("--s", type=float, default=1.05)
    z.add_argument("--vocab", type=int, default=150000)
    z.add_argument("--max-parallel", dest="max_parallel", type=int, default=8)
    z.add_argument("--json", action="store_true")
    z.set_defaults(func=cmd_zipf)
    lk = sub.add_parser("likelihood", help="NELBO / perplexity bound of a run (exact NLL for AR)")
    lk.add_argument("run_dir")
    lk.add_argument("--samples", type=count, default=8, help="Monte-Carlo replicates (t and masks)")
    lk.add_argument("--split", default="test", help="train | validation | test | zero_shot (text tasks)")
    lk.add_argument("--n", type=count, default=None, help="rows (spread over the split); default all")
    lk.add_argument("--batch-size", dest="batch_size", type=count, default=64)
    lk.add_argument("--seed", type=int, default=0)
    lk.add_argument("--json", action="store_true")
    lk.set_defaults(func=cmd_likelihood)
    sw = sub.add_parser("sweep", help="train a grid of runs (orders x tasks x seeds ...); finished runs are skipped")
    sw.add_argument("config")
    sw.add_argument("--workers", type=count, default=None)
    sw.add_argument("--launcher", choices=["local", "submitit"], default=None)
    sw.add_argument("--force", action="store_true", help="rerun runs whose stored config differs from their grid "
                                                         "point (the old directory is moved to NAME.old-TIME)")
    sw.set_defaults(func=cmd_sweep)
    _module_command(sub, "report", "training-stability report of a sweep directory", sweep_report)
    _module_command(sub, "estimate", "FLOPs per step (counted on the CPU) and GPU hours of a sweep", estimate)
    _module_command(sub, "text-compare", "compare text runs: test / zero-shot PPL, gen PPL judged by an AR run, "
                    "unigram entropy, LoMDM velocity plots", text_compare)
    vw = sub.add_parser("view", help="one self-contained HTML page: the traces of runs step by step, side by side")
    viewer_view.add_arguments(vw)
    _add_decoder_args(vw)
    vw.set_defaults(func=cmd_view)
    _module_command(sub, "serve", "a local page (127.0.0.1) that decodes a puzzle and streams it step by step", viewer_server)
    for cmd in ("eval", "sample", "likelihood", "analyze", "report", "text-compare", "view", "serve", "export"):  # load runs
        _add_plugin_args(sub.choices[cmd])
    for q in sub.choices.values():
        q.add_argument("--threads", type=count, default=None, help="CPU threads for torch (default: torch's choice)")
    return p


def _add_plugin_args(p):
    p.add_argument("--plugin", dest="plugins", action="append", default=None, metavar="PATH_OR_MODULE",
                   help="import this plugin (a .py file or a module) instead of those the run's config lists "
                        "(repeatable); loading a run imports nothing by itself")
    p.add_argument("--trust-plugins", dest="trust_plugins", action="store_true",
                   help="import exactly the plugins the run's config lists (runs their code)")


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.threads is not None:
            set_threads(args.threads)
        with allowed(getattr(args, "plugins", None), getattr(args, "trust_plugins", False)):
            args.func(args)
    except USER_ERRORS as exc:
        print(f"anyorder: error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (training checkpoints first): one line, no traceback
        print(f"anyorder: interrupted{': ' + str(exc) if str(exc) else ''}", file=sys.stderr)
        return getattr(exc, "exit_code", 130)
    return 0


if __name__ == "__main__":
    sys.exit(main())
