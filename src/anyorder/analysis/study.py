"""Training-stability report for a sweep (seed 000's study; SPEC §6 "Training stability").

For every (task, order) group of runs (one run per seed) in a sweep directory:

- learning curves of the task's threshold metric: mean ± std across seeds at each evaluation;
- final value mean ± std and the share of seeds that reached the threshold τ;
- C(τ): cumulative training FLOPs at the first evaluation past τ (counted FLOPs, logged with
  every evaluation), mean over the seeds that reached it;
- task affinity A = log10(C_AR(τ) / C_order(τ)) against the AR group of the same task
  (> 0 favours the diffusion order; undefined if either never reached τ).

``write_report(sweep_dir)`` writes ``report.md`` and one PNG of curves per task.
"""
from __future__ import annotations

import json
import math
import operator
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

# task name -> (metric logged as val_<metric>, comparison, τ); SPEC §7
THRESHOLDS: Dict[str, Tuple[str, str, float]] = {
    "sudoku": ("cell_acc", ">=", 0.9),
    "star_graph": ("path_acc", ">=", 0.9),
    "linear_regression": ("nmse", "<", 0.01),  # MSE/d < 0.01: the paper's MSE < 0.1 at d = 10
}
OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def _order_label(order: dict) -> str:
    extra = ",".join(f"{k}={v}" for k, v in order.items() if k != "name")
    return order["name"] + (f"({extra})" if extra else "")


def load_runs(sweep_dir) -> List[dict]:
    runs = []
    for cfg_path in sorted(Path(sweep_dir).glob("*/config.yaml")):
        run = cfg_path.parent
        cfg = yaml.safe_load(cfg_path.read_text())
        metrics = run / "metrics.jsonl"
        evals = [json.loads(l) for l in metrics.read_text().splitlines()] if metrics.exists() else []
        evals = [e for e in evals if e.get("event") == "eval"]
        runs.append({"dir": run, "cfg": cfg, "evals": evals, "finished": (run / "model.safetensors").exists()})
    return runs


def first_crossing(evals: List[dict], key: str, op: str, tau: float) -> Optional[dict]:
    for e in evals:
        if key in e and OPS[op](e[key], tau):
            return e
    return None


def summarise(runs: List[dict], thresholds=THRESHOLDS) -> List[dict]:
    groups: Dict[Tuple[str, str], List[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["cfg"]["task"]["name"], _order_label(r["cfg"]["order"]))].append(r)
    rows = []
    for (task, order), rs in sorted(groups.items()):
        metric, op, tau = thresholds.get(task, (None, None, None))
        key = f"val_{metric}"
        finals = [r["evals"][-1][key] for r in rs if r["evals"] and key in r["evals"][-1]]
        hits = [first_crossing(r["evals"], key, op, tau) for r in rs] if metric else []
        c = [h["flops"] for h in hits if h is not None and "flops" in h]
        mean = sum(finals) / len(finals) if finals else float("nan")
        std = math.sqrt(sum((f - mean) ** 2 for f in finals) / len(finals)) if finals else float("nan")
        rows.append({"task": task, "order": order, "seeds": len(rs), "metric": key, "threshold": f"{op} {tau}",
                     "final_mean": mean, "final_std": std,
                     "reached": f"{sum(h is not None for h in hits)}/{len(rs)}",
                     "flops_to_threshold": (sum(c) / len(c)) if c else float("nan")})
    for row in rows:  # affinity against AR of the same task
        ar = next((r for r in rows if r["task"] == row["task"] and r["order"].startswith("ar")), None)
        ok = ar is not None and all(math.isfinite(x) and x > 0 for x in (ar["flops_to_threshold"], row["flops_to_threshold"]))
        row["affinity_vs_ar"] = math.log10(ar["flops_to_threshold"] / row["flops_to_threshold"]) if ok else float("nan")
    return rows


def plot_curves(runs: List[dict], task: str, key: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    groups = defaultdict(list)
    for r in runs:
        if r["cfg"]["task"]["name"] == task:
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
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel(key)
    ax.set_title(f"{task}: mean ± std over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(sweep_dir, thresholds=THRESHOLDS) -> Path:
    from .table import format_table

    sweep_dir = Path(sweep_dir)
    runs = load_runs(sweep_dir)
    if not runs:
        raise FileNotFoundError(f"{sweep_dir} holds no runs (no */config.yaml)")
    rows = summarise(runs, thresholds)
    lines = [f"# Study report: {sweep_dir.name}", "",
             f"{len(runs)} runs ({sum(r['finished'] for r in runs)} finished). Threshold metric per task, "
             "mean ± std of its final value over seeds, share of seeds past the threshold, training FLOPs "
             "to the threshold C(τ) (mean over the seeds that reached it) and task affinity "
             "A = log10(C_AR / C_order).", "", format_table(rows, columns=[
                 "task", "order", "seeds", "metric", "threshold", "final_mean", "final_std", "reached",
                 "flops_to_threshold", "affinity_vs_ar"]), ""]
    for task in sorted({r["task"] for r in rows}):
        key = next(r["metric"] for r in rows if r["task"] == task)
        png = plot_curves(runs, task, key, sweep_dir / f"curves_{task}.png")
        lines += [f"## {task}", "", f"![{task}]({png.name})", ""]
    out = sweep_dir / "report.md"
    out.write_text("\n".join(lines))
    (sweep_dir / "report.json").write_text(json.dumps(rows, indent=1, default=str))
    return out
