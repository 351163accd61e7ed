"""A decode on disk: one safetensors file per (run, decoder) -- never pickle.

Tensors (B rows, L positions, E events, K alternatives):

    x0 [B, L] long            the target rows (prompt + true answer)
    answer [B, L] bool        answer positions (masked at the start of the decode)
    tokens [B, L] long        the decoded rows
    correct [B] bool          the task's verdict per row
    finalize_step [B, L] long, confidence [B, L] float64, nfe [B] long    the trace
    events.row/step/pos/kind/token/order [E] long, events.conf [E] float64,
    events.alt_token [E, K] long, events.alt_prob [E, K] float32          every event (decoding/events.py)

Metadata (strings): ``format`` = ``anyorder.decode/1``; ``decoder`` (the spec, JSON); ``label``
(the decoder's display name); ``metrics`` (JSON); ``run`` (JSON: run directory, order label, task
name, grid shape, mask id); ``vocab`` (JSON: token id -> display string, for the ids that occur).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Union

import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from ..decoding.events import Events
from ..decoding.loop import DecodeResult
from ..decoding.trace import Trace

FORMAT = "anyorder.decode/1"


def decoder_label(spec) -> str:
    if isinstance(spec, str):
        return spec
    opts = ",".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return f"{spec['name']}({opts})" if opts else spec["name"]


def file_slug(label: str) -> str:
    """A file name for a decoder label (letters and digits kept, the rest ``_``)."""
    return "".join(ch if ch.isalnum() else "_" for ch in label).strip("_")


def save_decode(path: Union[str, Path], exp, spec, x0: torch.Tensor, answer: torch.Tensor, result: DecodeResult,
                metrics: Dict[str, Any], run_dir: str = "") -> Path:
    """Write one decode (see the module docstring); ``exp`` has ``task`` and ``order``."""
    tr = result.trace
    if tr.events is None:
        raise ValueError("this decode has no events to save (its trace was made without an event log)")
    task = exp.task
    ids = sorted(set(x0.unique().tolist()) | set(result.tokens.unique().tolist())
                 | set(tr.events.token[tr.events.token >= 0].tolist()) | set(tr.events.alt_token[tr.events.alt_token >= 0].tolist())
                 | {int(task.mask_id)})
    tensors = {"x0": x0, "answer": answer.bool(), "tokens": result.tokens,
               "correct": task.row_correct(result.tokens, x0, answer).bool(),
               "finalize_step": tr.finalize_step, "confidence": tr.confidence, "nfe": tr.nfe, **tr.events.tensors()}
    meta = {"format": FORMAT, "decoder": json.dumps(spec), "label": decoder_label(spec),
            "metrics": json.dumps(metrics, default=float),
            "run": json.dumps({"run_dir": str(run_dir), "order": exp.order.label(),
                               "task": task.name, "grid_shape": list(task.grid_shape) if task.grid_shape else None,
                               "mask_id": int(task.mask_id)}),
            "vocab": json.dumps({int(i): task.token_str(int(i)) for i in ids})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def load_decode(path: Union[str, Path]) -> Dict[str, Any]:
    """The saved decode as a dict: the tensors, ``trace`` (a :class:`Trace` with its events) and
    the metadata decoded from JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no saved decode at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a saved decode (format {meta.get('format')!r}, expected {FORMAT!r})")
    t = load_file(str(path))
    out: Dict[str, Any] = dict(t)
    out["trace"] = Trace(t["finalize_step"], t["confidence"], t["answer"], t["nfe"], Events.from_tensors(t))
    out["decoder"] = json.loads(meta["decoder"])
    out["label"] = meta["label"]
    out["metrics"] = json.loads(meta["metrics"])
    out["run"] = json.loads(meta["run"])
    out["vocab"] = {int(k): v for k, v in json.loads(meta["vocab"]).items()}
    return out
