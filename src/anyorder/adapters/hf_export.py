"""``anyorder export RUN_DIR --out DIR``: a trained hf-backbone run as a Hugging Face model directory.

The directory holds what ``from_pretrained`` reads: ``config.json`` and the weights as
``model.safetensors`` (``save_pretrained``; no pickle file is written, and one found afterwards
is an error), the task's tokenizer (``save_pretrained``, with the [MASK] token the task may have
added), and ``anyorder.json``: the order, mask id, ``shift_logits``, first decoder and whether
prompts were rendered with the chat template, plus the run's whole config. LoRA adapters are
merged into the base weights first (:func:`anyorder.model.lora.merge_lora`), so the directory is a
plain model. ``anyorder generate --model DIR`` reads ``anyorder.json`` and decodes with the
recorded order, decoder, mask id, shift and prompt format unless told otherwise.

A run whose task adds extra embeddings (Sudoku's row/column/box tables) is refused: a Hugging
Face directory has no place for them, and the model without them is not the trained one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

INFO_FILE = "anyorder.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def read_export_info(model_dir) -> Dict[str, Any]:
    """``anyorder.json`` of an exported directory ({} for any other model directory)."""
    path = Path(model_dir) / INFO_FILE
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}): re-export the run") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(info).__name__}: re-export the run")
    return info


def export_run(run_dir, out_dir, force: bool = False, plugins=None, trust_plugins: Optional[bool] = None) -> Path:
    """Write the run's (merged) model, tokenizer and ``anyorder.json`` to ``out_dir``; returns it."""
    from ..experiment import load_run  # lazy: experiment imports the adapters' neighbours (a cycle at import time)
    from ..model.lora import has_lora, merge_lora  # lazy: see above
    from .. import __version__  # lazy: the package's own __init__

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise ValueError(f"--out {str(out)!r} exists and is not an empty directory: choose another or pass --force")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    exp = load_run(run_dir, plugins=plugins, trust_plugins=trust_plugins)
    model = exp.model
    if not hasattr(model, "hf"):
        raise ValueError(f"{run_dir} trained the {exp.cfg['model'].get('backbone', 'native')!r} backbone; export "
                         f"writes Hugging Face directories of runs with model.backbone=hf")
    if model.cfg.extra_embeddings:
        raise ValueError(f"{run_dir}'s task adds extra embeddings ({', '.join(model.cfg.extra_embeddings)}) that a "
                         f"Hugging Face directory cannot hold; export runs of tasks without them (e.g. chat, text)")
    lora = has_lora(model)
    merge_lora(model)
    tok = getattr(exp.task, "hf_tokenizer", None)
    out.mkdir(parents=True, exist_ok=True)
    model.hf.save_pretrained(out, safe_serialization=True)
    if tok is not None:
        tok.save_pretrained(out)
    info = {"format": 1, "anyorder_version": __version__, "run_dir": str(Path(run_dir).resolve()),
            "order": exp.cfg["order"], "decoder": exp.cfg["decode"][0], "mask_id": int(model.cfg.mask_id),
            "shift_logits": bool(model.cfg.shift_logits), "attn_implementation": model.cfg.attn_implementation,
            "chat": getattr(exp.task, "template", None) == "chat_template", "lora_merged": lora,
            "tokenizer": tok is not None, "config": exp.cfg}
    (out / INFO_FILE).write_text(json.dumps(info, indent=1, default=str) + "\n")
    pickled = sorted(p.name for p in out.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise RuntimeError(f"export wrote pickle files {pickled} to {out}; only safetensors are allowed")
    return out


def add_arguments(p) -> None:
    p.add_argument("run_dir", help="a finished run directory whose config has model.backbone=hf")
    p.add_argument("--out", required=True, help="the Hugging Face directory to write (must not hold files)")
    p.add_argument("--force", action="store_true", help="replace --out if it holds files")


def run_from_args(args) -> None:
    out = export_run(args.run_dir, args.out, args.force, getattr(args, "plugins", None),
                     getattr(args, "trust_plugins", None))
    print(f"exported to {out} (decode: anyorder generate --model {out} --prompt ...)")
