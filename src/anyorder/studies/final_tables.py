"""Two tables a study report adds to its curves: the task's detail metrics at the end of training
(mean ± std over seeds) and every finished run decoded by each of its decoders.

* **Detail metrics** are those a task names in ``Task.detail_metrics`` (regular expressions over its
  metric names): per-step accuracy along a star-graph path, for instance, where the Clever-Hans
  signature of teacher-forced AR (Bachmann & Nagarajan, 2024, arXiv 2403.06963) is the first step's
  accuracy next to the later ones'. They are read from each run's last evaluation, so this costs
  nothing.
* **Decoders** (``anyorder report SWEEP --decode N``): each finished run is decoded on ``N``
  held-out examples with every decoder its config lists (``decode:``), as ``anyorder eval`` does,
  with the training FLOPs and wall time of the run beside the task's metrics (per difficulty grade
  where the task grades, e.g. Sudoku), AFP and NFE. Results are kept in the run directory
  (``decode_eval.json``, keyed by decoder and N), so a report re-run decodes only what is new.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

from ..analysis.table import format_table
from ..experiment import evaluate, load_run
from ..train.guard import finished_summary

DECODE_CACHE = "decode_eval.json"


def _label(spec) -> str:
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    extra = ",".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return spec["name"] + (f"({extra})" if extra else "")


def _mean_std_text(values: List[float]) -> str:
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    return f"{mean:.3f} ± {std:.3f}" if len(values) > 1 else f"{mean:.3f}"


def detail_rows(runs: List[dict], patterns_of) -> List[dict]:
    """One row per (task, order): mean ± std over seeds of the last evaluation's detail metrics.
    ``patterns_of(cfg)`` gives the task's regular expressions (empty: the task has none)."""
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    for r in runs:
        if r["evals"] and patterns_of(r["cfg"]):
            groups[(r["task"], _label(r["cfg"]["order"]))].append(r)
    rows = []
    for (task, order), rs in sorted(groups.items()):
        pats = [re.compile(p) for p in patterns_of(rs[0]["cfg"])]
        last = [r["evals"][-1] for r in rs]
        keys = [k[4:] for k in last[0] if k.startswith("val_") and any(p.fullmatch(k[4:]) for p in pats)]
        row = {"task": task, "order": order, "seeds": len(rs),
               "step": " / ".join(str(e.get("step", "?")) for e in last)}
        for k in keys:
            vals = [e[f"val_{k}"] for e in last if f"val_{k}" in e]
            row[k] = _mean_std_text(vals) if vals else ""
        rows.append(row)
    return rows


def detail_section(runs: List[dict], patterns_of, plot=None) -> List[str]:
    """Markdown of :func:`detail_rows`; ``plot(task, key)`` (optional) draws a metric's curves and
    returns the PNG's path, or None for a metric the task does not plot."""
    rows = detail_rows(runs, patterns_of)
    if not rows:
        return []
    lines = ["## Final evaluation, task detail metrics", "",
             "The last evaluation of every run, mean ± std over seeds (`step`: the step of that evaluation, "
             "per seed). Decoded with the first decoder of each run's config.", ""]
    for task in sorted({r["task"] for r in rows}):
        task_rows = [r for r in rows if r["task"] == task]
        lines += [f"### {task}", "", format_table(task_rows), ""]
        keys = [k for k in task_rows[0] if k not in ("task", "order", "seeds", "step")]
        pngs = [p for p in (plot(task, k) for k in keys) if p is not None] if plot else []
        lines += [f"![{task}: {Path(p).stem}]({Path(p).name})" for p in pngs] + ([""] if pngs else [])
    return lines


def decode_run(run: dict, n: int, specs: Optional[list] = None) -> List[dict]:
    """Rows (one per decoder) of ``run`` decoded on ``n`` held-out examples; cached in the run."""
    cache_path = Path(run["dir"]) / DECODE_CACHE
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    exp = None
    summary = finished_summary(run["dir"]) or {}
    flops = run["evals"][-1].get("flops", float("nan")) if run["evals"] else float("nan")
    rows = []
    for spec in specs or run["cfg"]["decode"]:
        key = json.dumps({"decoder": spec, "n": int(n)}, sort_keys=True)
        if key not in cache:
            exp = exp or load_run(run["dir"])
            cache[key] = evaluate(exp, spec, n=int(n))
            cache_path.write_text(json.dumps(cache, indent=1))  # each decoder's result as soon as it exists
        rows.append({"order": _label(run["cfg"]["order"]), "seed": run["cfg"].get("seed"), "decoder": _label(spec),
                     **cache[key], "n": int(n), "train_steps": summary.get("step", ""),
                     "train_flops": flops, "train_wall_s": run["wall_s"]})
    return rows


def decode_section(runs: List[dict], n: int, headline_of) -> List[str]:
    """Markdown of every finished run decoded by each of its decoders on ``n`` held-out examples;
    ``headline_of(cfg)``: the metric a task's rows lead with."""
    finished = [r for r in runs if r["finished"]]
    if not finished:
        return ["## Decoders", "", "No finished run to decode yet.", ""]
    lines = ["## Decoders on held-out examples", "",
             f"Every finished run decoded on {n} held-out examples with each decoder of its config "
             "(`anyorder eval RUN` gives the same numbers). `train_flops`: training FLOPs at the last "
             "evaluation; `train_wall_s`: training wall time (this machine, shared with other jobs).", ""]
    for task in sorted({r["task"] for r in finished}):
        rows = [row for r in finished if r["task"] == task for row in decode_run(r, n)]
        head = headline_of(next(r["cfg"] for r in finished if r["task"] == task))
        lines += [f"### {task}", "", format_table(rows, head), ""]
    return lines
