"""``anyorder view PATH... --out view.html``: one self-contained HTML page for the traces of
one or more runs, several decoders and orders side by side on the same prompts.

A PATH is a saved decode (``*.safetensors``, see :mod:`anyorder.evaluation.saved`) or a run
directory: its held-out rows are decoded with ``--decoder`` (or the decoders its config lists)
and saved to ``RUN_DIR/decodes/<decoder>.safetensors`` first. Runs of the same task share
their held-out prompts (``task.eval_set``), so row i of every panel is the same prompt.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional, Sequence

from ..evaluation.saved import decoder_label, file_slug, load_decode, save_decode
from ..experiment import load_run, run_decoder
from .data import page_data
from .page import render_page

DEFAULT_ALTERNATIVES = 3


def decode_run(run_dir, specs: Optional[Sequence] = None, n: int = 16,
               alternatives: int = DEFAULT_ALTERNATIVES, out_dir=None) -> List[Path]:
    """Decode ``n`` held-out rows of ``run_dir`` with each spec; save each decode; return the files."""
    exp = load_run(run_dir)
    specs = list(specs) if specs else list(exp.cfg["decode"])
    x0, answer = exp.task.eval_set(n)
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "decodes"
    paths = []
    for spec in specs:
        metrics, res = run_decoder(exp.model, exp, spec, x0, answer, return_results=True, alternatives=alternatives)
        paths.append(save_decode(out_dir / f"{file_slug(decoder_label(spec))}.safetensors", exp, spec, x0, answer, res,
                                 metrics, run_dir=str(run_dir)))
    return paths


def write_view(saved_paths: Sequence, out, title: str = "anyorder: decoding order, step by step",
               limit: Optional[int] = None) -> Path:
    """Write the page for these saved decodes to ``out``."""
    data = page_data([load_decode(p) for p in saved_paths], title, limit)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_page(data), encoding="utf-8")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help="run directories and/or saved decodes (*.safetensors)")
    p.add_argument("--out", default="view.html", help="the HTML file to write (default view.html)")
    p.add_argument("--n", type=int, default=16, help="held-out rows to decode per run directory (default 16)")
    p.add_argument("--alternatives", type=int, default=DEFAULT_ALTERNATIVES,
                   help="top tokens kept per commit, shown on hover (0: none)")
    p.add_argument("--title", default="anyorder: decoding order, step by step")


def run_from_args(args, specs: Optional[List] = None) -> Path:
    if args.n < 1:
        raise ValueError(f"--n must be an integer >= 1, got {args.n}")
    if not 0 <= args.alternatives <= 32:
        raise ValueError(f"--alternatives must be in [0, 32], got {args.alternatives}")
    saved: List[Path] = []
    for path in map(Path, args.paths):
        if path.is_dir():
            saved += decode_run(path, specs, args.n, args.alternatives)
        elif path.is_file():
            saved.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such run directory or saved decode")
    out = write_view(saved, args.out, args.title)
    print(f"viewer: {out} ({len(saved)} decodes)")
    return out
