"""Durable files: fsync'd JSON, safetensors tensor files (tied weights included), atomic replacement.

A file written here is on disk when the call returns (``os.fsync``), and a replaced file is written
beside its target first and then renamed over it, so a crash leaves the old or the new version
complete, never half of one.

safetensors rather than ``torch.save``: no pickle (loading cannot run code), and the files are
readable from any framework. The cost is that non-tensor state has to be split out into JSON.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


class CheckpointMismatchError(ValueError):
    """The tensors in a checkpoint do not fit the model/optimizer they are being loaded into."""


# ----------------------------------------------------------------------------- durable writes
def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make the renames inside ``path`` durable; not supported everywhere (Windows), then a no-op."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)  # str(): Paths etc. in run_info
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def replace_json(path: Path, obj: Any) -> None:
    """Write ``obj`` to ``path.tmp`` and rename it onto ``path``: readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write_json(tmp, obj)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- tensor files
def _shape(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(t.shape)


def _prepare_tensors(state: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """CPU, contiguous tensors safetensors will accept, plus an alias map for tied weights.

    safetensors refuses tensors that share memory. Tied weights (e.g. an embedding reused as the
    output projection) appear in a state_dict under two names with the same storage: we store the
    first name only and record ``alias -> stored name`` in the file metadata.
    """
    tensors: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    seen_views: Dict[tuple, str] = {}
    seen_storage: set = set()
    for name, t in state.items():
        if not torch.is_tensor(t):
            raise TypeError(f"state entry {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach()
        if t.numel() > 0:
            ptr = t.untyped_storage().data_ptr()
            view = (t.device, ptr, t.storage_offset(), _shape(t), t.stride(), t.dtype)
            if view in seen_views:
                aliases[name] = seen_views[view]
                continue
            if (t.device, ptr) in seen_storage:
                t = t.clone()  # overlapping but different view: store its own copy
            seen_views[view] = name
            seen_storage.add((t.device, ptr))
        tensors[name] = t.to("cpu").contiguous()
    return tensors, aliases


def save_tensors(path: Path, state: Mapping[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    tensors, aliases = _prepare_tensors(state)
    meta = {"format": "pt"}
    if aliases:
        meta["aliases"] = json.dumps(aliases, sort_keys=True)
    if metadata:
        meta.update(metadata)
    save_file(tensors, str(path), metadata=meta)
    fsync_file(path)


def load_tensors(path: Path) -> Dict[str, torch.Tensor]:
    tensors = load_file(str(path), device="cpu")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    for alias, target in json.loads(meta.get("aliases", "{}")).items():
        tensors[alias] = tensors[target]
    return tensors


def check_compatible(
    loaded: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str, path: Path
) -> None:
    """Raise a CheckpointMismatchError listing missing/unexpected keys and shape mismatches."""
    missing = [k for k in expected if k not in loaded]
    unexpected = [k for k in loaded if k not in expected]
    shapes = [
        (k, _shape(loaded[k]), _shape(expected[k]))
        for k in expected
        if k in loaded and _shape(loaded[k]) != _shape(expected[k])
    ]
    if not (missing or unexpected or shapes):
        return

    def listing(items: List[str], limit: int = 10) -> str:
        more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    parts = []
    if shapes:
        parts.append(
            "shape mismatch: "
            + listing([f"{k}: checkpoint {list(a)} vs {what} {list(b)}" for k, a, b in shapes])
        )
    if missing:
        parts.append(f"missing from the checkpoint: {listing(missing)}")
    if unexpected:
        parts.append(f"unexpected in the checkpoint (not in the {what}): {listing(unexpected)}")
    raise CheckpointMismatchError(
        f"{path} does not match the {what}: " + "; ".join(parts) + ". The checkpoint was saved from an "
        f"incompatible config (different architecture or sizes); build the {what} with the config it "
        "was trained with."
    )


__all__ = [
    "CheckpointMismatchError",
    "check_compatible",
    "fsync_dir",
    "fsync_file",
    "load_tensors",
    "replace_json",
    "save_tensors",
    "write_json",
]
