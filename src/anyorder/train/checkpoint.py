"""Checkpoints: a directory of safetensors + JSON files, replaced atomically; plain weight files.

Layout of ``<run_dir>/checkpoint/``::

    model.safetensors      model state_dict
    ema.safetensors        EMA weights (only when EMA is on)
    optimizer.safetensors  AdamW state tensors, keys ``state.{param_index}.{exp_avg|exp_avg_sq|step}``
    optimizer.json         param_groups hyper-parameters (+ any non-tensor state, parameter names)
    rng.safetensors        RNG states of every rank (torch CPU/CUDA, python, numpy)
    state.json             step, tokens_seen, flops, best metrics, config + hash, versions, RNG scalars,
                           the sha256 of every other file (``checksums``, checked on load)

Atomicity: everything is written into a fresh ``ckpt.tmp-PID@HOST-XXXX`` directory next to the target
and fsynced; only then is it renamed onto ``checkpoint/``. POSIX cannot rename a directory onto a
non-empty one, so the previous checkpoint is first renamed aside to ``ckpt.old-XXXX`` and deleted
after the swap. A crash at any point leaves either the old or the new checkpoint complete:
``find_checkpoint`` recovers the one crash window in which only ``ckpt.old-XXXX`` exists. Temp
folders carry their writer's pid and host, and a writer removes only its own leftovers and those
of dead processes, never a live writer's (one writer per run directory is the rule: ``lock.py``).
A sharded checkpoint (``train.strategy: fsdp``) holds ``sharded/`` instead of the model, EMA and
optimizer files; train/fsdp.py writes it through the same temp directory and swap.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .distributed import unwrap
from .faults import fault_point
from .files import (
    CheckpointMismatchError,
    check_compatible,
    check_sha256,
    file_sha256,
    fsync_dir,
    load_tensors,
    read_json,
    save_tensors,
    write_json,
)
from .lock import pid_alive
from .provenance import versions
from .rng import capture_rng_state, restore_rng_state, rng_from_files, rng_to_files

PathLike = Union[str, os.PathLike]

CHECKPOINT_DIR = "checkpoint"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
RNG_FILE = "rng.safetensors"
STATE_FILE = "state.json"
TMP_PREFIX = "ckpt.tmp-"
OLD_PREFIX = "ckpt.old-"


# ----------------------------------------------------------------------------- plain weights
def save_weights(model: Union[nn.Module, Mapping[str, torch.Tensor]], path: PathLike) -> Path:
    """Write ``model.state_dict()`` (or a state dict) to one safetensors file, atomically (a temp file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    os.close(fd)
    try:
        save_tensors(Path(tmp), model if isinstance(model, Mapping) else unwrap(model).state_dict())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_weights(model: nn.Module, path: PathLike) -> nn.Module:
    """Load a safetensors state_dict into ``model``; key/shape mismatches raise CheckpointMismatchError.

    ``path`` may also be a checkpoint directory (its ``model.safetensors`` is used).
    """
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(f"no weights file at {path}")
    model = unwrap(model)
    tensors = load_tensors(path)
    check_compatible(tensors, model.state_dict(), "model", path)
    model.load_state_dict(tensors)
    return model


# ----------------------------------------------------------------------------- optimizer state
def _optimizer_to_files(
    optimizer: torch.optim.Optimizer, param_names: Optional[List[str]]
) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: Dict[str, torch.Tensor] = {}
    other: Dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v
            else:
                other[f"{idx}.{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    meta = {"class": type(optimizer).__name__, "param_groups": groups, "non_tensor_state": other}
    if param_names is not None:
        meta["param_names"] = param_names
    return tensors, meta


def _load_optimizer(optimizer: torch.optim.Optimizer, ckpt_dir: Path, checksums: Dict[str, str]) -> None:
    where = f"in {ckpt_dir / STATE_FILE}"
    if OPTIMIZER_JSON in checksums:
        check_sha256(ckpt_dir / OPTIMIZER_JSON, file_sha256(ckpt_dir / OPTIMIZER_JSON), checksums[OPTIMIZER_JSON], where)
    meta = read_json(ckpt_dir / OPTIMIZER_JSON)
    tensors = load_tensors(ckpt_dir / OPTIMIZER_FILE, checksums.get(OPTIMIZER_FILE), where)
    if meta.get("class") and meta["class"] != type(optimizer).__name__:
        raise CheckpointMismatchError(
            f"{ckpt_dir / OPTIMIZER_JSON} holds {meta['class']} state but the optimizer is "
            f"{type(optimizer).__name__}"
        )
    groups = meta["param_groups"]
    current = optimizer.param_groups
    sizes_ckpt = [len(g["params"]) for g in groups]
    sizes_now = [len(g["params"]) for g in current]
    if sizes_ckpt != sizes_now:
        raise CheckpointMismatchError(
            f"{ckpt_dir / OPTIMIZER_JSON}: parameter groups of sizes {sizes_ckpt} in the checkpoint vs "
            f"{sizes_now} in the optimizer; the checkpoint was saved from an incompatible config"
        )
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])

    state: Dict[int, Dict[str, Any]] = {}
    for key, t in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = t
    for key, v in meta.get("non_tensor_state", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v

    # torch.optim does not check state shapes; a mismatch would only surface (or not!) at the
    # next step, so check moment buffers against the parameters they belong to now.
    params = [p for g in current for p in g["params"]]
    names = meta.get("param_names") or [str(i) for i in range(len(params))]
    bad = []
    for idx, st in state.items():
        for name, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0 and tuple(v.shape) != tuple(params[idx].shape):
                label = names[idx] if idx < len(names) else str(idx)
                bad.append(f"state.{idx}.{name} ({label}): checkpoint {list(v.shape)} vs parameter {list(params[idx].shape)}")
    if bad:
        raise CheckpointMismatchError(
            f"{ckpt_dir / OPTIMIZER_FILE} does not match the optimizer: shape mismatch: {', '.join(bad[:10])}. "
            "The checkpoint was saved from an incompatible config."
        )
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ----------------------------------------------------------------------------- directories
_OWNED = re.compile(r"^ckpt\.(?:tmp|old)-(\d+)@(.+)-[^-]+$")


def _writer_tag() -> str:
    return f"{os.getpid()}@{socket.gethostname()}-"


def _owner_gone(p: Path) -> bool:
    """True for a leftover of this process or of a dead one (this host); False for a live writer's
    or another host's. Untagged names come from older versions: leftovers."""
    m = _OWNED.match(p.name)
    if m is None:
        return True
    pid, host = int(m.group(1)), m.group(2)
    if host != socket.gethostname():
        return False
    return pid == os.getpid() or not pid_alive(pid)


def _cleanup_stale(parent: Path, live: Path) -> None:
    """Delete leftovers of a crashed save: half-written temp dirs, and superseded old checkpoints
    (only while a complete live one exists -- otherwise find_checkpoint may still need them).
    Only folders of this process or of dead ones: a concurrent writer's are left alone."""
    for p in parent.glob(TMP_PREFIX + "*"):
        if _owner_gone(p):
            shutil.rmtree(p, ignore_errors=True)
    if (live / STATE_FILE).exists():
        for p in parent.glob(OLD_PREFIX + "*"):
            if _owner_gone(p):
                shutil.rmtree(p, ignore_errors=True)


def find_checkpoint(run_dir: PathLike) -> Optional[Path]:
    """``run_dir/checkpoint`` if there is a complete one, else None.

    Also recovers from a crash in the instant between moving the old checkpoint aside and moving
    the new one in: then only ``ckpt.old-XXXX`` exists, and it is complete, so it is moved back.
    """
    run_dir = Path(run_dir)
    ckpt = run_dir / CHECKPOINT_DIR
    if (ckpt / STATE_FILE).exists():
        return ckpt
    if ckpt.exists():
        raise RuntimeError(f"{ckpt} exists but has no {STATE_FILE}; it was not written by save_checkpoint")
    olds = sorted(
        (p for p in run_dir.glob(OLD_PREFIX + "*") if (p / STATE_FILE).exists()),
        key=lambda p: read_json(p / STATE_FILE).get("step", -1),
    )
    if olds:
        os.replace(olds[-1], ckpt)
        return ckpt
    return None


def begin_checkpoint(ckpt_dir: PathLike) -> Path:
    """A fresh temp directory next to ``ckpt_dir`` (leftovers of crashed saves removed first)."""
    ckpt_dir = Path(ckpt_dir)
    parent = ckpt_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    _cleanup_stale(parent, ckpt_dir)
    return Path(tempfile.mkdtemp(prefix=TMP_PREFIX + _writer_tag(), dir=parent))


def finish_checkpoint(
    tmp: Path,
    ckpt_dir: PathLike,
    checksums: Dict[str, str],
    *,
    step: int,
    tokens_seen: int = 0,
    flops: Optional[float] = None,
    best: Optional[Dict[str, Any]] = None,
    config: Any = None,
    rng_states: Optional[List[Dict[str, Any]]] = None,
    extra: Optional[Dict[str, Any]] = None,
    has_ema: bool = False,
    has_optimizer: bool = False,
    layout: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write the RNG file and state.json into ``tmp`` (which holds the files of ``checksums``), then
    swap it onto ``ckpt_dir``. ``layout``: entries state.json gets for a non-default layout (a
    sharded checkpoint: train/fsdp.py)."""
    ckpt_dir = Path(ckpt_dir)
    parent = ckpt_dir.parent
    rng_tensors, rng_scalars = rng_to_files(rng_states if rng_states is not None else [capture_rng_state()])
    checksums[RNG_FILE] = save_tensors(tmp / RNG_FILE, rng_tensors)

    if config is not None and hasattr(config, "to_dict"):
        config_dict, config_hash = config.to_dict(), config.hash()
    else:
        config_dict, config_hash = config, None
    state = {
        "step": int(step),
        "tokens_seen": int(tokens_seen),
        "flops": flops,
        "best": best or {},
        "config": config_dict,
        "config_hash": config_hash,
        "versions": versions(),
        "saved_at": time.time(),
        "world_size": len(rng_scalars),
        "has_ema": has_ema,
        "has_optimizer": has_optimizer,
        "rng": rng_scalars,
        "extra": extra or {},
        **(layout or {}),
        # sha256 of each file: of the tensors for a .safetensors (tensors_sha256), of the bytes otherwise
        "checksums": checksums,
    }
    write_json(tmp / STATE_FILE, state)
    fsync_dir(tmp)
    fault_point("ckpt_write")

    if ckpt_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=OLD_PREFIX + _writer_tag(), dir=parent))
        os.replace(ckpt_dir, old)  # rename onto an empty dir is allowed
        fault_point("ckpt_write")  # the window find_checkpoint repairs: only ckpt.old-* exists
        os.replace(tmp, ckpt_dir)
        fault_point("ckpt_write")
        fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, ckpt_dir)
    fsync_dir(parent)
    return ckpt_dir


def save_checkpoint(
    ckpt_dir: PathLike,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    ema: Any = None,
    **fields: Any,
) -> Path:
    """Atomically write a checkpoint directory at ``ckpt_dir`` (usually ``run_dir/checkpoint``).

    ``ema`` is anything with ``state_dict()`` (an ``EMA`` or a module). ``fields`` go to
    :func:`finish_checkpoint`: ``step`` (required), ``tokens_seen``, ``flops``, ``best``,
    ``config`` (a TrainConfig, whose hash is stored for resume checks, or a plain dict), ``extra``
    and ``rng_states`` (one ``capture_rng_state()`` per rank, index = rank; by default this
    process's state as rank 0).
    """
    model = unwrap(model)
    tmp = begin_checkpoint(ckpt_dir)
    try:
        checksums = {MODEL_FILE: save_tensors(tmp / MODEL_FILE, model.state_dict())}
        fault_point("ckpt_write")
        if ema is not None:
            checksums[EMA_FILE] = save_tensors(tmp / EMA_FILE, ema.state_dict())
        if optimizer is not None:
            names = _param_names(model, optimizer)
            tensors, meta = _optimizer_to_files(optimizer, names)
            checksums[OPTIMIZER_FILE] = save_tensors(tmp / OPTIMIZER_FILE, tensors)
            fault_point("ckpt_write")
            write_json(tmp / OPTIMIZER_JSON, meta)
            checksums[OPTIMIZER_JSON] = file_sha256(tmp / OPTIMIZER_JSON)
        return finish_checkpoint(tmp, ckpt_dir, checksums, has_ema=ema is not None,
                                 has_optimizer=optimizer is not None, **fields)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_checkpoint(ckpt_dir: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    ema: Any = None, *, rank: int = 0, restore_rng: bool = True) -> Dict[str, Any]:
    """Restore model, optimizer, EMA and (this rank's) RNG state; returns the parsed state.json.

    Raises CheckpointMismatchError (a ValueError) naming keys and shapes when the checkpoint does
    not fit the model. If ``ema`` is given but the checkpoint has none, the EMA starts from the
    loaded model weights (with a warning).
    """
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / STATE_FILE).exists():
        raise FileNotFoundError(f"no checkpoint at {ckpt_dir} (missing {STATE_FILE})")
    state = read_json(ckpt_dir / STATE_FILE)
    if state.get("sharded"):
        raise CheckpointMismatchError(f"{ckpt_dir} is a sharded checkpoint (written with train.strategy=fsdp); "
                                      "resume it with train.strategy=fsdp")
    checksums = state.get("checksums") or {}  # none in a checkpoint written before checksums
    where = f"in {ckpt_dir / STATE_FILE}"
    model = unwrap(model)

    tensors = load_tensors(ckpt_dir / MODEL_FILE, checksums.get(MODEL_FILE), where)
    check_compatible(tensors, model.state_dict(), "model", ckpt_dir / MODEL_FILE)
    model.load_state_dict(tensors)

    if ema is not None:
        if (ckpt_dir / EMA_FILE).exists():
            ema_tensors = load_tensors(ckpt_dir / EMA_FILE, checksums.get(EMA_FILE), where)
            check_compatible(ema_tensors, ema.state_dict(), "EMA model", ckpt_dir / EMA_FILE)
            ema.load_state_dict(ema_tensors)
        else:
            warnings.warn(f"{ckpt_dir} has no EMA weights; the EMA starts from the loaded model weights")
            ema.load_state_dict(model.state_dict())

    if optimizer is not None:
        if (ckpt_dir / OPTIMIZER_JSON).exists():
            _load_optimizer(optimizer, ckpt_dir, checksums)
        else:
            warnings.warn(f"{ckpt_dir} has no optimizer state; the optimizer starts fresh")

    if restore_rng:
        restore_rng_of_rank(ckpt_dir, state, rank)
    return state


def restore_rng_of_rank(ckpt_dir: Path, state: Dict[str, Any], rank: int) -> None:
    """Restore this rank's RNG state from the checkpoint's RNG file (a warning if it has none)."""
    if not (ckpt_dir / RNG_FILE).exists():
        return
    where = f"in {ckpt_dir / STATE_FILE}"
    tensors = load_tensors(ckpt_dir / RNG_FILE, (state.get("checksums") or {}).get(RNG_FILE), where)
    rng = rng_from_files(tensors, state.get("rng", {}), rank)
    if rng is None:
        warnings.warn(f"{ckpt_dir} has no RNG state for rank {rank} (saved with world size "
                      f"{state.get('world_size')}); RNG not restored, so the resumed run is not bit-exact")
    else:
        restore_rng_state(rng)


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> Optional[List[str]]:
    """Names of the optimizer's parameters in state_dict index order (for readable errors)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    names = [by_id.get(id(p)) for g in optimizer.param_groups for p in g["params"]]
    return None if any(n is None for n in names) else names  # type: ignore[return-value]


__all__ = ["CHECKPOINT_DIR", "begin_checkpoint", "find_checkpoint", "finish_checkpoint", "load_checkpoint", "load_weights",
           "restore_rng_of_rank", "save_checkpoint", "save_weights"]
