"""Durable files: fsync'd JSON, safetensors tensor files (tied weights included), atomic replacement.

A file written here is on disk when the call returns (``os.fsync``), and a replaced file is written
beside its target first and then renamed over it, so a crash leaves the old or the new version
complete, never half of one.

safetensors rather than ``torch.save``: no pickle (loading cannot run code), and the files are
readable from any framework. The cost is that non-tensor state has to be split out into JSON.

Checksums: every tensor file written here carries, in its safetensors metadata, the sha256 of its
tensors (names, dtypes, shapes and bytes; :func:`tensors_sha256`). :func:`load_tensors` recomputes
it and raises :class:`CorruptFileError` naming the file on a mismatch -- safetensors itself reads
zeroed or flipped data bytes without complaint. Files written before this (no recorded sha256)
still load. A JSON file that does not parse is a CorruptFileError naming it too (:func:`read_json`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

SHA256_KEY = "tensors_sha256"  # the safetensors metadata entry holding tensors_sha256() of the file


class CheckpointMismatchError(ValueError):
    """The tensors in a checkpoint do not fit the model/optimizer they are being loaded into."""


class CorruptFileError(ValueError):
    """A file on disk is not what was written: a checksum mismatch, or unreadable contents."""


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


def read_json(path: Path, kind: type = dict) -> Any:
    """Parse a JSON file written by :func:`write_json`; unparsable contents raise CorruptFileError naming it."""
    try:
        obj = json.loads(Path(path).read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CorruptFileError(f"{path} is corrupted: not valid JSON ({e})") from None
    if not isinstance(obj, kind):
        raise CorruptFileError(f"{path} is corrupted: expected a JSON {kind.__name__}, found {type(obj).__name__}")
    return obj


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_sha256(path: Path, actual: str, expected: Optional[str], where: str = "when it was written") -> None:
    """One-line CorruptFileError naming ``path`` if ``expected`` is given and differs from ``actual``."""
    if expected is not None and actual != expected:
        raise CorruptFileError(
            f"{path} is corrupted: its sha256 is {actual[:12]}..., not the {expected[:12]}... recorded {where}; "
            "restore the file or retrain"
        )


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


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of each CPU tensor, in name order: what a file stores."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_tensors(path: Path, state: Mapping[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> str:
    """Write a safetensors file (sha256 of its tensors in its metadata); returns that sha256."""
    tensors, aliases = _prepare_tensors(state)
    digest = tensors_sha256(tensors)
    meta = {"format": "pt", SHA256_KEY: digest}
    if aliases:
        meta["aliases"] = json.dumps(aliases, sort_keys=True)
    if metadata:
        meta.update(metadata)
    save_file(tensors, str(path), metadata=meta)
    fsync_file(path)
    return digest


def load_tensors(path: Path, expected_sha256: Optional[str] = None, where: str = "") -> Dict[str, torch.Tensor]:
    """Read a safetensors file, checking the sha256 in its metadata (when it has one) and, if given,
    ``expected_sha256`` (recorded elsewhere, e.g. in a checkpoint's state.json: ``where``)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        aliases = json.loads(meta.get("aliases", "{}"))
    except (SafetensorError, ValueError) as e:  # a damaged header, a truncated file
        raise CorruptFileError(f"{path} is corrupted: not a readable safetensors file ({e})") from None
    if SHA256_KEY in meta or expected_sha256 is not None:
        actual = tensors_sha256(tensors)
        check_sha256(path, actual, meta.get(SHA256_KEY), "in its header")
        check_sha256(path, actual, expected_sha256, where or "for it")
    for alias, target in aliases.items():
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
    "CorruptFileError",
    "check_compatible",
    "check_sha256",
    "file_sha256",
    "fsync_dir",
    "fsync_file",
    "load_tensors",
    "read_json",
    "replace_json",
    "save_tensors",
    "tensors_sha256",
    "write_json",
]
