"""Global RNG state: seeding, capture and restore (every rank), forking, and its form on disk.

Training draws from the global RNGs (dropout, random masks; torch, python and numpy), so an exact
resume needs every rank's state of all of them, and evaluation must leave them untouched.
"""
from __future__ import annotations

import contextlib
import random
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch


def seed_all(seed: int) -> None:
    """Seed torch (CPU and CUDA), python and numpy."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def capture_rng_state() -> Dict[str, Any]:
    """Every global RNG a training step might draw from (dropout, random masks, numpy, python)."""
    state: Dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    # only if CUDA was actually used: get_rng_state_all would otherwise initialise every device
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(
                f"checkpoint has CUDA RNG states for {len(cuda)} devices but {torch.cuda.device_count()} "
                "are visible; CUDA RNG not restored, so the resumed run is not bit-exact"
            )


def gather_rng_states(world_size: int) -> List[Dict[str, Any]]:
    """Every rank's state, indexed by rank (collective under torchrun): each rank has its own
    dropout/masking stream, and all of them are needed for an exact resume."""
    state = capture_rng_state()
    if world_size == 1:
        return [state]
    gathered: List[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, state)
    return gathered


@contextlib.contextmanager
def forked_rng():
    """Run a block without consuming the global RNG streams (so eval cannot shift training)."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


# ----------------------------------------------------------------------------- on disk
def rng_to_files(states: List[Dict[str, Any]]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Per-rank states (index = rank) as tensors ``rank{r}.*`` for safetensors plus JSON scalars."""
    tensors: Dict[str, torch.Tensor] = {}
    scalars: Dict[str, Any] = {}
    for rank, st in enumerate(states):
        p = f"rank{rank}"
        tensors[f"{p}.torch_cpu"] = st["torch_cpu"]
        py_version, py_internal, py_gauss = st["python"]
        tensors[f"{p}.python"] = torch.tensor(py_internal, dtype=torch.int64)
        np_name, np_keys, np_pos, np_has_gauss, np_cached = st["numpy"]
        tensors[f"{p}.numpy"] = torch.from_numpy(np.asarray(np_keys).astype(np.int64))
        for i, c in enumerate(st.get("cuda") or []):
            tensors[f"{p}.cuda.{i}"] = c
        scalars[p] = {
            "python_version": py_version,
            "python_gauss": py_gauss,
            "numpy_name": np_name,
            "numpy_pos": int(np_pos),
            "numpy_has_gauss": int(np_has_gauss),
            "numpy_cached_gaussian": float(np_cached),
            "cuda_devices": len(st.get("cuda") or []),
        }
    return tensors, scalars


def rng_from_files(tensors: Mapping[str, torch.Tensor], scalars: Mapping[str, Any], rank: int) -> Optional[Dict[str, Any]]:
    """The state of ``rank`` (as :func:`capture_rng_state` returns it), or None if it was not saved."""
    p = f"rank{rank}"
    if p not in scalars:
        return None
    s = scalars[p]
    internal = tuple(int(x) for x in tensors[f"{p}.python"].tolist())
    keys = tensors[f"{p}.numpy"].numpy().astype(np.uint32)
    state: Dict[str, Any] = {
        "torch_cpu": tensors[f"{p}.torch_cpu"],
        "python": (s["python_version"], internal, s["python_gauss"]),
        "numpy": (s["numpy_name"], keys, s["numpy_pos"], s["numpy_has_gauss"], s["numpy_cached_gaussian"]),
    }
    if s.get("cuda_devices"):
        state["cuda"] = [tensors[f"{p}.cuda.{i}"] for i in range(s["cuda_devices"])]
    return state


__all__ = [
    "capture_rng_state",
    "forked_rng",
    "gather_rng_states",
    "restore_rng_state",
    "rng_from_files",
    "rng_to_files",
    "seed_all",
]
