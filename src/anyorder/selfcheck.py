"""``anyorder selfcheck``: does this machine train and decode every order? One command, one JSON.

On the device torch picks (a GPU when there is one) it trains a small model on 4x4 Sudoku under
every registered order in bf16, then, for each run, decodes the held-out set with the order's
decoder without and with the exact KV cache (docs/kv_cache.md) and compares the tokens; it trains
the ``random`` run once more under ``train.strategy=fsdp`` (FSDP2 on a one-rank process group);
and it records tokens/s (training and decoding), wall time and peak device memory
(``torch.cuda.max_memory_allocated``). ``tiny=True`` shrinks everything so the CPU runs the whole
check in seconds (the test does). The check fails (``ok`` false, exit status 1) when a run
fails or a cached decode differs from the uncached one.
"""
from __future__ import annotations

import json
import platform
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .config import load_config
from .decoding import build_decoder
from .orders import ORDERS

# (task, model, train, eval) overrides: "full" fits one GPU in well under 8 minutes (7 orders + FSDP at
# 300 steps of 256 x 33 tokens); "tiny" is for the CPU test.
SIZES = {
    "full": {"task.n_train": 20000, "task.n_eval": 256, "model.d_model": 256, "model.n_layers": 6, "model.n_heads": 4,
             "train.steps": 300, "train.batch_size": 256, "train.warmup_steps": 30, "train.lr": 1e-3,
             "train.log_every": 100, "eval.n": 256},
    "tiny": {"task.n_train": 200, "task.n_eval": 8, "model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2,
             "train.steps": 3, "train.batch_size": 8, "train.warmup_steps": 1, "train.lr": 1e-3,
             "train.log_every": 1, "eval.n": 8},
}


def _peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_mib() -> Optional[float]:
    return torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None


def _train(out_dir: Path, name: str, order: str, size: str, extra: Dict[str, Any]) -> Dict[str, Any]:
    """Train one run (bf16, Sudoku 4x4) and return its record: tokens/s, wall time, peak memory."""
    from .experiment import train  # lazy: the experiment imports every piece
    over = {"task.name": "sudoku", "task.size": 4, "task.n_clues": 5, "order.name": order, "train.precision": "bf16",
            "train.progress": False, "out_dir": str(out_dir), "name": name, **SIZES[size], **extra}
    cfg = load_config(None, [f"{k}={v}" for k, v in over.items()])
    _peak_reset()
    t0 = time.perf_counter()
    run_dir = train(cfg)
    wall = time.perf_counter() - t0
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"run_dir": str(run_dir), "wall_s": round(wall, 2), "train_tokens_per_s": summary.get("tokens_per_s"),
            "final_loss": summary["metrics"].get("loss"), "peak_mib": _peak_mib()}


def _decode(run_dir: str, n: int) -> Dict[str, Any]:
    """Decode the held-out set with the order's decoder, uncached and cached; compare the tokens."""
    from .experiment import load_run  # lazy: as above
    exp = load_run(run_dir)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    exp.model.to(device)
    out: Dict[str, Any] = {"decoder": exp.order.default_decoder}
    tokens = {}
    for cache in (False, True):
        _peak_reset()
        spec = {"name": exp.order.default_decoder, "cache": cache}
        try:
            build_decoder(dict(spec))
        except ValueError as exc:  # the decoder refuses a cache for this order (e.g. a bidirectional one)
            out["cached"] = {"unavailable": str(exc)}
            return out
        metrics, res = exp.objective.evaluate(exp.model, spec, n, batch_size=n, return_results=True)
        key = "cached" if cache else "uncached"
        tokens[key] = res.tokens.cpu()
        out[key] = {"tokens_per_s": metrics.get("tokens_per_s"), "nfe": metrics.get("nfe"),
                    "peak_mib": _peak_mib(), **{k: v for k, v in metrics.items() if k.endswith("_acc")}}
    same = (tokens["cached"] == tokens["uncached"]).all(dim=-1)
    out["rows_equal"] = int(same.sum())
    out["rows"] = int(same.numel())
    out["cached_equals_uncached"] = bool(same.all())
    return out


def run_selfcheck(out_dir: str | Path, tiny: bool = False, orders: Optional[List[str]] = None,
                  echo=print) -> Dict[str, Any]:
    """Run the whole check into ``out_dir`` (one run directory per order, ``selfcheck.json``)."""
    out_dir = Path(out_dir)
    size = "tiny" if tiny else "full"
    report: Dict[str, Any] = {
        "size": size, "torch": torch.__version__, "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})",
        "orders": {}, "fsdp": {},
    }
    failures: List[str] = []
    t_start = time.perf_counter()
    for order in orders or ORDERS.names():
        try:
            rec = _train(out_dir, order, order, size, {})
            rec["decode"] = _decode(rec["run_dir"], int(SIZES[size]["eval.n"]))
            if not rec["decode"].get("cached_equals_uncached", True):
                failures.append(f"{order}: cached decoding differs from uncached")
        except Exception as exc:  # a self-check reports every failure, then goes on
            rec = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=6)}
            failures.append(f"{order}: {rec['error']}")
        report["orders"][order] = rec
        echo(_line(order, rec))
    try:  # FSDP2 on one rank: the random order again, sharded (its own one-rank process group)
        rec = _train(out_dir, "random-fsdp", "random", size, {"train.strategy": "fsdp"})
        plain = report["orders"].get("random", {})
        rec["final_loss_plain"] = plain.get("final_loss")
    except Exception as exc:
        rec = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=6)}
        failures.append(f"fsdp: {rec['error']}")
    report["fsdp"] = rec
    echo(_line("fsdp", rec))
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    report["failures"] = failures
    report["ok"] = not failures
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "selfcheck.json").write_text(json.dumps(report, indent=2, default=str))
    echo(f"selfcheck {'ok' if report['ok'] else 'FAILED'} in {report['wall_s']} s on {report['device']}: "
         f"{out_dir / 'selfcheck.json'}" + "".join(f"\n  {f}" for f in failures))
    return report


def _fmt(x, spec=".3g") -> str:
    return "-" if x is None else format(x, spec)


def _line(name: str, rec: Dict[str, Any]) -> str:
    if "error" in rec:
        return f"{name:>13}  ERROR {rec['error']}"
    line = (f"{name:>13}  train {_fmt(rec['train_tokens_per_s'])} tok/s  loss {_fmt(rec['final_loss'])}  "
            f"peak {_fmt(rec['peak_mib'], '.0f')} MiB  {rec['wall_s']} s")
    dec = rec.get("decode")
    if dec and "rows" in dec:
        line += (f"  | decode {dec['decoder']}: {_fmt(dec['uncached']['tokens_per_s'])} tok/s uncached, "
                 f"{_fmt(dec['cached']['tokens_per_s'])} cached, equal rows {dec['rows_equal']}/{dec['rows']}")
    elif dec:
        line += f"  | decode {dec['decoder']}: {_fmt(dec['uncached']['tokens_per_s'])} tok/s uncached, no cache"
    return line


__all__ = ["SIZES", "run_selfcheck"]
