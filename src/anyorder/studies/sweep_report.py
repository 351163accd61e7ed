"""Training-stability report for a sweep: curves over seeds, FLOPs to threshold, task affinity.

The study of "On the Trainability of Masked Diffusion Language Models via Blockwise Locality"
(2026): for every (task, order) group of runs (one run per seed) in a sweep directory,

- learning curves of the task's threshold metric (``Task.threshold``): mean ± std across seeds
  at each evaluation;
- final value mean ± std and the share of seeds that reached the threshold τ;
- C(τ): cumulative training FLOPs at the first evaluation past τ (counted FLOPs, logged with
  every evaluation), mean over the seeds that reached it;
- task affinity A = log10(C_AR(τ) / C_order(τ)) against the AR group of the same task
  (> 0 favours the diffusion order; undefined if either never reached τ).

For in-context linear regression it adds the plot of Garg et al. (2022, arXiv 2208.01066): the
error on the R query y's against the number k = 0 … P of in-context (x, y) examples, next to
least squares, ridge and the zero predictor on the same prompts (``context_curve``; mean ± std
over seeds per order).

``write_report(sweep_dir)`` writes ``report.md`` and one PNG of curves per task.
"""
from __future__ import annotations

import json
import math
import operator
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import yaml

from ..analysis.table import format_table
from ..decoding.regression import predict
from ..experiment import load_run
from .final_tables import decode_section, detail_section
from ..sweep import OLD_RUN
from ..tasks import TASKS
from ..tasks.linear_regression import LinearRegressionTask, least_squares, ridge
from ..rundir import training_seconds
from ..train.guard import finished_summary

OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
REFERENCE_ORDER = "ar"  # task affinity compares every order with this one


def _order_label(order: dict) -> str:
    extra = ",".join(f"{k}={v}" for k, v in order.items() if k != "name")
    return order["name"] + (f"({extra})" if extra else "")


def load_runs(sweep_dir) -> List[dict]:
    runs = []
    for cfg_path in sorted(Path(sweep_dir).glob("*/config.yaml")):
        run = cfg_path.parent
        if OLD_RUN.search(run.name):
            continue  # moved aside by `anyorder sweep --force`: not part of the sweep any more
        cfg = yaml.safe_load(cfg_path.read_text())
        metrics = run / "metrics.jsonl"
        lines = [json.loads(l) for l in metrics.read_text().splitlines()] if metrics.exists() else []
        evals = [e for e in lines if e.get("event") == "eval"]
        info = run / "run.json"
        start = json.loads(info.read_text()).get("start_time") if info.exists() else None
        runs.append({"dir": run, "cfg": cfg, "evals": evals, "finished": finished_summary(run) is not None,
                     "wall_s": training_seconds(lines, start)})
    # a sweep over task sizes (d, degree, path_len, ...) gets one group per size, not one per task name
    varying = defaultdict(set)
    for name in {r["cfg"]["task"]["name"] for r in runs}:
        tasks = [r["cfg"]["task"] for r in runs if r["cfg"]["task"]["name"] == name]
        for key in set().union(*tasks) - {"name", "seed"}:
            if len({json.dumps(t.get(key), sort_keys=True) for t in tasks}) > 1:
                varying[name].add(key)
    for r in runs:
        task = r["cfg"]["task"]
        extra = ",".join(f"{k}={task.get(k)}" for k in sorted(varying[task["name"]]))
        r["task"] = task["name"] + (f"({extra})" if extra else "")
    return runs


def _mean_std(values: List[float]) -> Tuple[float, float]:
    """Mean and population std (over seeds); NaNs for no values."""
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def task_class(cfg: dict):
    """The registered class of a run's task (None for a name this process does not know, e.g. a
    plugin's task: the report then has no threshold for it)."""
    name = cfg["task"]["name"]
    return TASKS.get(name) if name in TASKS else None


def threshold_for(cfg: dict, thresholds: Optional[Dict[str, Tuple[str, str, float]]] = None):
    """(metric, op, τ) of a run's task, as the task states it for the run's task options
    (``Task.threshold_for``: linear regression's ``tau_nmse`` overrides its τ); ``thresholds``
    ({task name: (metric, op, τ)}) replaces the task's own."""
    if thresholds and cfg["task"]["name"] in thresholds:
        return tuple(thresholds[cfg["task"]["name"]])
    cls = task_class(cfg)
    return cls.threshold_for(cfg["task"]) if cls is not None else (None, None, None)


def secondary_metric(cfg: dict) -> Optional[str]:
    cls = task_class(cfg)
    return cls.secondary_metric if cls is not None else None


def first_crossing(evals: List[dict], key: str, op: str, tau: float) -> Optional[dict]:
    for e in evals:
        if key in e and OPS[op](e[key], tau):
            return e
    return None


def summarise(runs: List[dict], thresholds: Optional[Dict[str, Tuple[str, str, float]]] = None,
              reference: str = REFERENCE_ORDER) -> List[dict]:
    """One row per (task, order) group (``thresholds``: see :func:`threshold_for`); task affinity
    against the first group of the same task whose order is named ``reference``."""
    groups: Dict[Tuple[str, str], List[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["task"], _order_label(r["cfg"]["order"]))].append(r)
    rows, order_names = [], []
    for (task, order), rs in sorted(groups.items()):
        order_names.append(rs[0]["cfg"]["order"]["name"])
        metric, op, tau = threshold_for(rs[0]["cfg"], thresholds)
        key = f"val_{metric}"
        finals = [r["evals"][-1][key] for r in rs if r["evals"] and key in r["evals"][-1]]
        hits = [first_crossing(r["evals"], key, op, tau) for r in rs] if metric else []
        c = [h["flops"] for h in hits if h is not None and "flops" in h]
        mean, std = _mean_std(finals)
        per_seed = " / ".join(f"{f:.3g}" for f in finals)
        rows.append({"task": task, "order": order, "seeds": len(rs), "metric": key, "threshold": f"{op} {tau}",
                     "final_mean": mean, "final_std": std, "per_seed": per_seed,
                     "reached": f"{sum(h is not None for h in hits)}/{len(rs)}",
                     "flops_to_threshold": (sum(c) / len(c)) if c else float("nan")})
        second = f"val_{secondary_metric(rs[0]['cfg']) or ''}"
        vals = [r["evals"][-1][second] for r in rs if r["evals"] and second in r["evals"][-1]]
        if vals:
            m2, s2 = _mean_std(vals)
            rows[-1]["also"] = f"{second} {m2:.3f} ± {s2:.3f}"
        budget = [r["evals"][-1]["flops"] for r in rs if r["evals"] and "flops" in r["evals"][-1]]
        rows[-1]["flops_trained"] = min(budget) if budget else float("nan")
    for row in rows:  # affinity against the reference order (AR) of the same task
        ar = next((r for r, o in zip(rows, order_names) if r["task"] == row["task"] and o == reference), None)
        ok = ar is not None and all(math.isfinite(x) and x > 0 for x in (ar["flops_to_threshold"], row["flops_to_threshold"]))
        row["affinity_vs_ar"] = math.log10(ar["flops_to_threshold"] / row["flops_to_threshold"]) if ok else float("nan")
        # AR never reached τ within its budget: C_AR > that budget, so A is bounded below
        bound = (ar is not None and not math.isfinite(ar["flops_to_threshold"])
                 and math.isfinite(row["flops_to_threshold"]) and math.isfinite(ar["flops_trained"]))
        row["affinity_bound"] = (f"> {math.log10(ar['flops_trained'] / row['flops_to_threshold']):.2f}"
                                 if bound else "")
    return rows


def plot_curves(runs: List[dict], task: str, key: str, path: Path, threshold_line: bool = True) -> Path:
    import matplotlib  # lazy: matplotlib is heavy and only the plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib is heavy and only the plots need it

    fig, ax = plt.subplots(figsize=(6, 4))
    groups = defaultdict(list)
    for r in runs:
        if r["task"] == task:
            groups[_order_label(r["cfg"]["order"])].append(r)
    for order, rs in sorted(groups.items()):
        curves = [[(e["flops"], e[key]) for e in r["evals"] if key in e and "flops" in e] for r in rs]
        n = min((len(c) for c in curves), default=0)
        if n == 0:
            continue
        x = np.array([p[0] for p in curves[0][:n]])
        y = np.array([[p[1] for p in c[:n]] for c in curves])
        m, s = y.mean(0), y.std(0)
        ax.plot(x, m, label=f"{order} (n={len(rs)})")
        ax.fill_between(x, m - s, m + s, alpha=0.2)
    first = next((r for r in runs if r["task"] == task), None)
    tau = threshold_for(first["cfg"])[2] if first is not None and threshold_line else None
    if tau is not None:
        ax.axhline(tau, color="gray", linestyle="--", linewidth=0.8, label=f"τ = {tau:g}")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel(key)
    ax.set_title(f"{task}: mean ± std over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- error against the number of in-context examples (linear regression; Garg et al. 2022) -----------
def context_curve(exp, n: int = 256) -> Dict[str, List[float]]:
    """MSE on the R query y's (mean over queries and prompts) with only the first k prompt pairs
    visible, k = 0 … P, for the trained model (decoded with its order, as in evaluation) and for
    least squares, ridge and zero on the same k pairs of the same ``n`` validation prompts.

    How k < P is shown to a model trained with exactly P pairs: pairs k+1 … P are *dropped* (not
    masked) and every remaining slot keeps its training position (RoPE index and x/y parity). Each
    query then sees the first k pairs at exactly the offsets it saw them at in training; only keys
    are missing, as if attention to them were masked out. Masking the dropped y's instead would put
    the mask vector on prompt slots, which no order ever masks in training; renumbering positions
    would move the queries 2(P−k) places closer to the examples than training ever put them. At
    k = P this is the ordinary evaluation (the same number as ``val_mse`` on the same prompts)."""
    task, order, model = exp.task, exp.order, exp.model
    P, L = task.P, task.seq_len
    batch = task.eval_set(n)
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    y = batch.ys[:, P:].double()
    out: Dict[str, List[float]] = {"k": list(range(P + 1)), "model": [], "lstsq": [], "ridge": [], "zero": []}
    for k in range(P + 1):
        keep = torch.cat([torch.arange(2 * k), torch.arange(2 * P, L)])        # first k pairs + the queries

        def at_training_positions(values, masked, attn_mask=None, pos=keep.to(device)):
            return model(values, masked, attn_mask=attn_mask, positions=pos)

        values, answer = batch.values[:, keep].to(device), batch.answer[:, keep].to(device)
        pred, _ = predict(at_training_positions, order, values, answer)
        out["model"].append(float(((pred.double().cpu() - y) ** 2).mean()))
        xs = torch.cat([batch.xs[:, :k], batch.xs[:, P:]], 1)
        ys = torch.cat([batch.ys[:, :k], batch.ys[:, P:]], 1)
        zero = torch.zeros_like(y)
        for name, p in (("lstsq", least_squares(xs, ys, k) if k else zero),
                        ("ridge", ridge(xs, ys, k, task.ridge_lambda) if k else zero), ("zero", zero)):
            out[name].append(float(((p.double() - y) ** 2).mean()))
    model.train(was)
    return out


def _is_regression(cfg: dict) -> bool:
    """In-context linear regression: the runs :func:`context_curve` applies to."""
    cls = task_class(cfg)
    return cls is not None and issubclass(cls, LinearRegressionTask)


def _regression_key(cfg: dict) -> Tuple[int, int, int]:
    t = cfg["task"]
    return int(t.get("d", 20)), int(t.get("n_prompt", 20)), int(t.get("n_query", 20))


def context_curves(runs: List[dict], cache_dir: Path, n: int = 256) -> List[dict]:
    """``context_curve`` of every finished linear-regression run, cached per run in ``cache_dir``
    (recomputed when the weights or ``n`` change)."""
    out = []
    for r in runs:
        if not (_is_regression(r["cfg"]) and r["finished"]):
            continue
        stamp = (r["dir"] / "model.safetensors").stat().st_mtime_ns
        cache = cache_dir / f"{r['dir'].name}.json"
        data = json.loads(cache.read_text()) if cache.exists() else {}
        if data.get("weights_mtime_ns") != stamp or data.get("n") != n:
            exp = load_run(r["dir"])
            if torch.cuda.is_available():  # paper-scale runs: P+1 decodes of n prompts each
                exp.model.cuda()
            data = {"weights_mtime_ns": stamp, "n": n, "curve": context_curve(exp, n)}
            cache_dir.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(data))
        out.append({"run": r, "curve": data["curve"]})
    return out


def plot_context_curves(curves: List[dict], key: Tuple[int, int, int], path: Path) -> Path:
    """Normalised error (MSE/d) against k, mean ± std over seeds per order, with the baselines."""
    import matplotlib  # lazy: matplotlib is heavy and only the plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib is heavy and only the plots need it

    d, P, R = key
    fig, ax = plt.subplots(figsize=(6, 4))
    groups = defaultdict(list)
    for c in curves:
        groups[_order_label(c["run"]["cfg"]["order"])].append(np.array(c["curve"]["model"]) / d)
    k = np.arange(P + 1)
    for order, ys in sorted(groups.items()):
        y = np.stack(ys)
        m, s = y.mean(0), y.std(0)
        ax.plot(k, m, marker=".", label=f"{order} (n={len(ys)})")
        ax.fill_between(k, m - s, m + s, alpha=0.2)
    first = curves[0]["curve"]  # the baselines depend only on the prompts, shared by every run
    for name, style in (("lstsq", dict(color="black", ls="--", label="least squares")),
                        ("ridge", dict(color="gray", ls=":", label="ridge")),
                        ("zero", dict(color="gray", ls="-.", lw=0.8, label="zero"))):
        ax.plot(k, np.array(first[name]) / d, **style)
    ax.axvline(d, color="black", lw=0.5, alpha=0.4)  # k = d: least squares becomes exact
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("in-context examples k (first k prompt pairs visible)")
    ax.set_ylabel("squared error / d on the query y's")
    ax.set_title(f"linear regression d={d}, P={P}, R={R}: mean ± std over seeds")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def context_section(runs: List[dict], sweep_dir: Path, n: int = 256, out_dir: Optional[Path] = None) -> List[str]:
    """Markdown lines (and PNGs) of the error-against-examples plot per (d, P, R); [] if no
    finished linear-regression run."""
    curves = context_curves(runs, sweep_dir / "context_curves", n)
    if not curves:
        return []
    lines = ["## linear_regression: error against the number of in-context examples", "",
             f"Squared error / d on the R query y's of {n} validation prompts when only the first k prompt "
             "pairs are visible (the other pairs are dropped; every remaining slot keeps its training "
             "position, so each query sees those k pairs exactly where it saw them in training). Mean ± std "
             "over seeds per order; least squares (minimum norm), ridge and zero on the same k pairs of the "
             "same prompts. k = P is the ordinary evaluation.", ""]
    by_key = defaultdict(list)
    for c in curves:
        by_key[_regression_key(c["run"]["cfg"])].append(c)
    for key, cs in sorted(by_key.items()):
        d, P, R = key
        png = plot_context_curves(cs, key, (out_dir or sweep_dir) / f"context_curve_d{d}_P{P}_R{R}.png")
        ks = sorted({0, min(d // 2, P), min(d, P), P})
        groups = defaultdict(list)
        for c in cs:
            groups[_order_label(c["run"]["cfg"]["order"])].append(c["curve"]["model"])
        rows = []
        for order, ys in sorted(groups.items()):
            row = {"predictor": order, "seeds": len(ys)}
            for k in ks:
                mean, std = _mean_std([y[k] / d for y in ys])
                row[f"k={k}"] = f"{mean:.3g} ± {std:.2g}"
            rows.append(row)
        for name, label in (("lstsq", "least squares"), ("ridge", "ridge"), ("zero", "zero")):
            rows.append({"predictor": label, "seeds": "", **{f"k={k}": f"{cs[0]['curve'][name][k] / d:.3g}" for k in ks}})
        lines += [f"### d = {d}, P = {P}, R = {R}", "", f"![error against in-context examples, d={d}]({png.name})", "",
                  format_table(rows, columns=["predictor", "seeds"] + [f"k={k}" for k in ks]), ""]
    return lines


def _file_name(task: str) -> str:
    return re.sub(r'[^A-Za-z0-9_.=-]+', '_', task)


def write_report(sweep_dir, thresholds=None, context_n: int = 256, out_dir=None, decode_n: int = 0) -> Path:
    """report.md, report.json and the PNGs into ``out_dir`` (default: the sweep directory);
    ``decode_n`` > 0 adds every finished run decoded by each of its decoders on that many examples."""
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = load_runs(sweep_dir)
    if not runs:
        raise FileNotFoundError(f"{sweep_dir} holds no runs (no */config.yaml)")
    rows = summarise(runs, thresholds)
    lines = [f"# Study report: {sweep_dir.name}", "",
             f"{len(runs)} runs ({sum(r['finished'] for r in runs)} finished; their training wall-clock times, "
             f"each the time its processes spent training, a stop before a resume not counted, sum to {sum(r['wall_s'] for r in runs if math.isfinite(r['wall_s'])):.0f} s). "
             "Threshold metric per task, "
             "mean ± std of its final value over seeds, share of seeds past the threshold, training FLOPs "
             "to the threshold C(τ) (mean over the seeds that reached it) and task affinity "
             "A = log10(C_AR / C_order).", "", format_table(rows, columns=[
                 "task", "order", "seeds", "metric", "threshold", "final_mean", "final_std", "per_seed", "reached",
                 "flops_to_threshold", "affinity_vs_ar", "affinity_bound", "also"]), "",
             "`affinity_bound`: where AR never reached τ, C_AR exceeds AR's whole training budget "
             "(`flops_trained`), so A > log10(AR's budget / C_order).", ""]
    for task in sorted({r["task"] for r in rows}):
        key = next(r["metric"] for r in rows if r["task"] == task)
        png = plot_curves(runs, task, key, out_dir / f"curves_{_file_name(task)}.png")
        lines += [f"## {task}", "", f"![{task}]({png.name})", ""]
    def plot_detail(task, key):  # the task's detail_curves, e.g. a star graph's per-step accuracy
        cfg = next(r["cfg"] for r in runs if r["task"] == task)
        if not any(re.fullmatch(p, key) for p in getattr(task_class(cfg), "detail_curves", ())):
            return None
        return plot_curves(runs, task, f"val_{key}", out_dir / f"curves_{_file_name(task)}_{key}.png",
                           threshold_line=False)

    lines += detail_section(runs, lambda cfg: getattr(task_class(cfg), "detail_metrics", ()), plot_detail)
    if decode_n:
        lines += decode_section(runs, decode_n, lambda cfg: threshold_for(cfg, thresholds)[0] or "")
    lines += context_section(runs, sweep_dir, context_n, out_dir)
    out = out_dir / "report.md"
    out.write_text("\n".join(lines))
    (out_dir / "report.json").write_text(json.dumps(rows, indent=1, default=str))
    return out


# -- command line (``anyorder report``) --------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("sweep_dir")
    p.add_argument("--out", default=None, help="write report.md, report.json and PNGs here (default: SWEEP_DIR)")
    p.add_argument("--decode", type=int, default=0, metavar="N",
                   help="also decode every finished run with each decoder of its config on N held-out "
                        "examples (cached in the run directory)")


def run_from_args(args) -> Path:
    if args.decode < 0:
        raise ValueError(f"--decode must be a number of examples >= 0, got {args.decode}")
    out = write_report(args.sweep_dir, out_dir=args.out, decode_n=args.decode)
    print(f"report: {out}")
    return out
