"""What a sweep will cost on a GPU, from FLOPs counted on the real training step (on the CPU).

For every run of a sweep (``sweep.expand``) the experiment is built exactly as ``train()`` builds
it, the FLOPs of one optimizer step are counted with ``experiment.step_flops`` (PyTorch's FLOP
counter on a real forward + backward, the same number ``train()`` logs as ``flops_per_step``),
and, optionally, a few real training steps run on the CPU to prove the config trains. Then

    total FLOPs = train.steps × FLOPs/step
    GPU hours   = total FLOPs / (peak FLOP/s × MFU) / 3600

with the peak and the model-FLOPs utilisation (MFU) as stated assumptions: by default an H100 SXM's
dense BF16 peak (989 TFLOP/s, no sparsity) at 40 % MFU. Evaluation and data generation are not
counted. Small models (width 256, batch 64) rarely reach 40 % MFU: treat the default as a lower
bound on time and pass a measured ``mfu`` when one is known.

Runs that differ only in their seed share one measurement: a step's shapes, hence its FLOPs, do
not depend on the seed. Datasets are capped at ``max_data`` examples while building (the FLOPs of
a step do not depend on how many examples the task holds, and the paper-scale datasets, e.g.
800k star graphs, are slow and large to build).
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import tempfile
from typing import Any, Dict, List

import torch

from ..experiment import build, make_loss_fn, step_flops, steps_for_budget, train_config
from ..sweep import DATA_KEYS, cap_data, expand, load_sweep  # noqa: F401  (DATA_KEYS: this module's API)
from ..train import Trainer

H100_BF16_DENSE_TFLOPS = 989.0   # H100 SXM, dense BF16 tensor-core peak (1979 is with 2:4 sparsity)
DEFAULT_MFU = 0.4


def gpu_hours(total_flops: float, peak_tflops: float = H100_BF16_DENSE_TFLOPS, mfu: float = DEFAULT_MFU) -> float:
    """Hours at ``mfu`` of a ``peak_tflops`` device: total / (peak × mfu) / 3600."""
    if not peak_tflops > 0:
        raise ValueError(f"GPU peak must be > 0 TFLOP/s, got {peak_tflops}")
    if not 0 < mfu <= 1:
        raise ValueError(f"MFU must be in (0, 1], got {mfu}")
    return float(total_flops) / (peak_tflops * 1e12 * mfu) / 3600.0


def _shape_key(cfg: Dict[str, Any]) -> str:
    """Everything that fixes a step's shapes: the config without seed, name and output folder."""
    c = json.loads(json.dumps(cfg))
    for k in ("seed", "name", "out_dir"):
        c.pop(k, None)
    return json.dumps(c, sort_keys=True)


def train_steps(cfg: Dict[str, Any], flops_per_step: float) -> int:
    """The optimizer steps ``train()`` will run: ``train.steps``, or as many as fit
    ``train.flops_budget`` when one is set (floor(budget / FLOPs per step), at least one)."""
    budget = cfg["train"].get("flops_budget")
    return int(cfg["train"]["steps"]) if budget is None else steps_for_budget(budget, flops_per_step)


def measure_run(cfg: Dict[str, Any], cpu_steps: int = 2, max_data: int = 4096) -> Dict[str, Any]:
    """Build the run, count one optimizer step's FLOPs, train ``cpu_steps`` real steps (temp dir)."""
    exp = build(cap_data(cfg, max_data))
    tcfg, _ = train_config(exp.cfg)  # a budget is resolved into steps by train_steps()
    loss_fn = make_loss_fn(exp)
    out = {"params": sum(p.numel() for p in exp.model.parameters()), "flops_per_step": step_flops(exp, loss_fn, tcfg),
           "cpu_steps": 0, "cpu_loss": float("nan")}
    if cpu_steps > 0:
        short, _ = train_config(exp.cfg, steps=int(cpu_steps), warmup_steps=0, eval_every=0, checkpoint_every=0,
                                log_every=int(cpu_steps), progress=False, tensorboard=False, wandb=False)
        # the trainer's log line goes to stderr: stdout carries the estimate (and --json)
        with tempfile.TemporaryDirectory(prefix="anyorder-estimate-") as tmp, contextlib.redirect_stdout(sys.stderr):
            summary = Trainer(exp.model, loss_fn, short, tmp).fit()
        loss = float(summary["metrics"].get("loss", float("nan")))
        if not math.isfinite(loss):
            raise ValueError(f"run {cfg.get('name')!r}: training loss is {loss} after {cpu_steps} CPU steps")
        out.update(cpu_steps=int(summary["step"]), cpu_loss=loss)
    torch.manual_seed(0)  # leave no run-dependent global RNG state behind
    return out


def estimate(runs: List, cpu_steps: int = 2, peak_tflops: float = H100_BF16_DENSE_TFLOPS,
             mfu: float = DEFAULT_MFU, max_data: int = 4096, log=None) -> Dict[str, Any]:
    """``runs``: [(label, resolved config)] as ``sweep.expand`` returns. Per run and total:
    params, FLOPs/step, total training FLOPs and GPU hours under the stated assumptions."""
    gpu_hours(1.0, peak_tflops, mfu)  # validate the assumptions before any work
    cache: Dict[str, Dict[str, Any]] = {}
    rows = []
    for label, cfg in runs:
        key = _shape_key(cfg)
        if key not in cache:
            if log:
                log(f"measuring {cfg['out_dir']}/{label} ...")
            cache[key] = dict(measure_run(cfg, cpu_steps, max_data), label=label)
        m = cache[key]
        steps = train_steps(cfg, m["flops_per_step"])
        total = steps * m["flops_per_step"]
        rows.append({"run": label, "sweep": cfg["out_dir"], "params": m["params"],
                     "flops_per_step": m["flops_per_step"], "steps": steps, "total_flops": float(total),
                     "gpu_hours": gpu_hours(total, peak_tflops, mfu), "measured_on": m["label"],
                     "cpu_steps": m["cpu_steps"], "cpu_loss": m["cpu_loss"]})
    total_flops = float(sum(r["total_flops"] for r in rows))
    return {"assumptions": {"gpu_peak_tflops": peak_tflops, "mfu": mfu,
                            "note": "GPU hours = steps x FLOPs/step / (peak x MFU); training steps only "
                                    "(evaluation and data generation not counted)"},
            "runs": rows, "distinct_configs": len(cache),
            "total": {"runs": len(rows), "total_flops": total_flops,
                      "gpu_hours": gpu_hours(total_flops, peak_tflops, mfu)}}


def estimate_sweeps(paths, cpu_steps: int = 2, peak_tflops: float = H100_BF16_DENSE_TFLOPS,
                    mfu: float = DEFAULT_MFU, max_data: int = 4096, log=None) -> Dict[str, Any]:
    """``estimate`` over one or more sweep files (or dicts); runs of all of them, one total."""
    runs = []
    for p in paths:
        runs += expand(load_sweep(p))
    return estimate(runs, cpu_steps, peak_tflops, mfu, max_data, log)


def format_estimate(res: Dict[str, Any]) -> str:
    """Markdown: the assumptions, one row per run, a total per sweep and overall."""
    a = res["assumptions"]
    lines = [f"Assumptions: GPU peak {a['gpu_peak_tflops']:g} TFLOP/s (default: H100 SXM dense BF16), "
             f"MFU {a['mfu']:g}; {a['note']}. FLOPs/step counted with PyTorch's FLOP counter on one real "
             f"training step on the CPU ({res['distinct_configs']} distinct configs; runs that differ only "
             "in the seed share one count).", "",
             "| sweep | run | params | FLOPs/step | steps | total FLOPs | GPU hours | CPU steps run | CPU loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        own = r["measured_on"] == r["run"]
        cpu = f"{r['cpu_steps']} | {r['cpu_loss']:.4g}" if own else f"as {r['measured_on']} |"
        lines.append(f"| {r['sweep']} | {r['run']} | {r['params']:,} | {r['flops_per_step']:.3e} | {r['steps']:,} | "
                     f"{r['total_flops']:.3e} | {r['gpu_hours']:.3f} | {cpu} |")
    lines += ["", "| sweep | runs | total FLOPs | GPU hours |", "|---|---|---|---|"]
    by: Dict[str, List[Dict[str, Any]]] = {}
    for r in res["runs"]:
        by.setdefault(r["sweep"], []).append(r)
    for sweep, rs in by.items():
        flops = sum(r["total_flops"] for r in rs)
        lines.append(f"| {sweep} | {len(rs)} | {flops:.3e} | {sum(r['gpu_hours'] for r in rs):.2f} |")
    t = res["total"]
    lines.append(f"| **total** | {t['runs']} | {t['total_flops']:.3e} | **{t['gpu_hours']:.2f}** |")
    return "\n".join(lines)


# -- command line (``anyorder estimate``) ------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("sweeps", nargs="+", metavar="SWEEP.yaml")
    p.add_argument("--steps", type=int, default=2, help="real CPU training steps per distinct config (0: count only)")
    p.add_argument("--gpu-peak", dest="gpu_peak", type=float, default=H100_BF16_DENSE_TFLOPS,
                   help=f"GPU peak TFLOP/s (default {H100_BF16_DENSE_TFLOPS:g}: H100 SXM dense BF16)")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                   help=f"assumed model-FLOPs utilisation (default {DEFAULT_MFU:g})")
    p.add_argument("--max-data", dest="max_data", type=int, default=4096,
                   help="cap task.n_train / n_eval while building (FLOPs do not depend on it; 0: no cap)")
    p.add_argument("--json", action="store_true")


def run_from_args(args) -> Dict[str, Any]:
    res = estimate_sweeps(args.sweeps, cpu_steps=args.steps, max_data=args.max_data, peak_tflops=args.gpu_peak,
                          mfu=args.mfu, log=None if args.json else (lambda s: print(s, file=sys.stderr, flush=True)))
    print(json.dumps(res, indent=1) if args.json else format_estimate(res))
    return res
