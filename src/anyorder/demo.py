"""``anyorder demo``: one backbone, three orders, several decoders, one table and one picture.

Trains the same small transformer on 4×4 Sudoku under random masking (MDLM: Sahoo et al.,
2024, arXiv 2406.07524), left-to-right AR and block diffusion (BD3-LM: Arriola et al., 2025,
arXiv 2503.09573; block 4 = one grid row), decodes the held-out puzzles with several policies,
and prints puzzle/cell accuracy, NFE, AFP and Kendall's τ per (order, decoder). Finished runs
are reused (delete the output directory to retrain); an interrupted run resumes from its
checkpoint.
"""
from __future__ import annotations

import copy
import json
import platform
import time
from pathlib import Path

import torch

from .analysis.plots import finalization_grid
from .analysis.table import format_table
from .config import load_config, merge
from .experiment import evaluate, load_run, train

DEMO_CONFIG = {
    "seed": 0,
    "task": {"name": "sudoku", "size": 4, "n_clues": 5, "n_train": 20000, "n_eval": 500, "seed": 0},
    "model": {"d_model": 128, "n_layers": 4, "n_heads": 4},
    "train": {"steps": 500, "batch_size": 64, "lr": 1.0e-3, "warmup_steps": 50, "precision": "auto",
              "log_every": 100, "eval_every": 0, "checkpoint_every": 250, "progress": False},
    "eval": {"n": 500},
}

# (order, decoders). AR allows only its leftmost hole, so its decoder choice does not matter.
PLAN = [
    ({"name": "random"}, [{"name": "margin"}, {"name": "top_prob"}, {"name": "entropy"}, {"name": "random"},
                          {"name": "left_to_right"}, {"name": "margin", "k": 2}, {"name": "top_prob", "k": 4}]),
    ({"name": "ar"}, [{"name": "left_to_right"}]),
    ({"name": "block", "block_size": 4}, [{"name": "margin"}, {"name": "random"}, {"name": "margin", "k": 2}]),
]


def _label(order, dec):
    o = order["name"] + (f"(S={order['block_size']})" if "block_size" in order else "")
    opts = ",".join(f"{k}={v}" for k, v in dec.items() if k != "name")
    return o, dec["name"] + (f"({opts})" if opts else "")


def run_demo(out_dir="runs/demo", steps=None, quick: bool = False, n_eval: int = 500):
    out = Path(out_dir)
    t_start = time.time()
    rows, panels, runs = [], {}, {}
    for order, decoders in PLAN:
        user = copy.deepcopy(DEMO_CONFIG)
        user.update({"order": order, "name": order["name"], "out_dir": str(out), "decode": decoders})
        if steps is not None or quick:
            user["train"]["steps"] = steps or 20
            user["train"]["warmup_steps"] = min(user["train"]["warmup_steps"], user["train"]["steps"] - 1)
        if quick:
            user["task"].update({"n_train": 500, "n_eval": 64})
        cfg = load_config(None, [])
        cfg = merge(cfg, user)
        run_dir = out / order["name"]
        t0 = time.time()
        if not (run_dir / "model.safetensors").exists():
            print(f"== training order {order['name']!r} ({cfg['train']['steps']} steps) ==", flush=True)
            train(cfg, run_dir)
        runs[order["name"]] = {"run_dir": str(run_dir), "train_seconds": round(time.time() - t0, 1)}
        exp = load_run(run_dir)
        n = min(n_eval, len(exp.task.eval_p))
        for dec in decoders:
            res, result = evaluate(exp, dec, n=n, return_results=True)
            o, d = _label(order, dec)
            rows.append({"order": o, "decoder": d, "puzzle_acc": res["puzzle_acc"], "cell_acc": res["cell_acc"],
                         "nfe": res["nfe"], "afp": res["afp"], "kendall_tau": res["kendall_tau"]})
            ans = result.trace.answer[0]
            panels[f"{o}\n{d}"] = result.trace.finalize_step[:, ans][:4]
            print(format_table(rows[-1:], "puzzle_acc").splitlines()[-1], flush=True)
    table = format_table(rows, "puzzle_acc")
    print()
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    png = finalization_grid(panels, out / "order_heatmap.png", n_examples=4, grid_shape=(4, 4),
                            title="4x4 Sudoku: step at which each cell was finalised (number = step)")
    (out / "table.md").write_text(table + "\n")
    meta = {"rows": rows, "runs": runs, "config": DEMO_CONFIG, "plan": PLAN, "n_eval": n_eval,
            "seconds": round(time.time() - t_start, 1), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "cpu_threads": torch.get_num_threads()}
    (out / "results.json").write_text(json.dumps(meta, indent=1))
    print(f"\ntable: {out / 'table.md'}   picture: {png}   results: {out / 'results.json'}")
    return rows
