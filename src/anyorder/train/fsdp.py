"""``train.strategy: fsdp``: FSDP2 sharding, sharded checkpoints and the consolidated weights.

FSDP2 (``torch.distributed.fsdp.fully_shard``; Zhao et al., 2023, arXiv 2304.11277 for FSDP) keeps
on each rank 1/N of every parameter, its gradient and its AdamW moments, and all-gathers a
block's parameters just before the block runs. Here it shards every unit a backbone names
(``shard_units()``: the native transformer's blocks, a Hugging Face model's decoder layers),
then the root -- the :class:`~.distributed.LossStep` around the model, not the model itself, so
whatever the loss calls (``hidden``, ``head_logits``, several passes) runs with the root's
parameters (embeddings, norm, head) gathered, as under DDP.

Precision: with bf16 chosen, a ``MixedPrecisionPolicy`` gathers parameters in bf16 and
reduce-scatters gradients in fp32; the sharded parameters and optimizer state stay fp32.

Gradient accumulation: every micro-step reduce-scatters its gradient and the sharded gradients
accumulate (FSDP's default). ``set_requires_gradient_sync(False)`` would save those collectives
but keep a full unsharded gradient per rank between micro-steps -- the memory FSDP is for.

Checkpoints (``<run_dir>/checkpoint/``, swapped in atomically like the unsharded ones)::

    sharded/shard-0000{r+1}-model-00001-of-00001.safetensors   rank r's shards: model.*, optim.*, ema.*
    optimizer.json   param_groups (hyper-parameters, parameter names), written by rank 0
    rng.safetensors, state.json   as for an unsharded checkpoint; state.json has "sharded": "sharded"

The shards go through ``torch.distributed.checkpoint`` (DCP) with its safetensors storage
(``HuggingFaceStorageWriter/Reader``, every rank writing its own file): each tensor chunk's
offsets live in the file's JSON header, so loading reads no pickle at all -- DCP's default
``FileSystemReader`` unpickles its ``.metadata`` file and reads non-tensor entries through
torch's unrestricted (``weights_only=False``) loader. Non-tensor state (param_groups, step, RNG
scalars) is JSON. A load reshards (another world size reads the same files).

Evaluation and the final ``model.safetensors`` need full weights: :meth:`FSDPStrategy.full_state_dict`
gathers them to rank 0 (a collective), and rank 0 evaluates in a plain copy of the model made
before sharding (one unsharded model in rank 0's memory, only when there is an evaluation).
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import OPTIMIZER_JSON, STATE_FILE, begin_checkpoint, finish_checkpoint, restore_rng_of_rank
from .distributed import all_reduce_sum
from .faults import fault_point
from .files import CheckpointMismatchError, check_sha256, file_sha256, read_json, write_json

SHARDED_DIR = "sharded"


def shard_units(model: nn.Module) -> List[nn.Module]:
    """The modules sharded one by one: what each sub-module with a ``shard_units()`` method names
    (a backbone inside a larger model -- LoMDM's -- is found too)."""
    units: List[nn.Module] = []
    seen = set()
    for module in model.modules():
        ask = getattr(module, "shard_units", None)
        for unit in (ask() if callable(ask) else ()):
            if id(unit) not in seen:
                seen.add(id(unit))
                units.append(unit)
    return units


def ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group even on one process (``anyorder selfcheck``): a one-rank one."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _sharded_files(ckpt: Path) -> List[Path]:
    return sorted((ckpt / SHARDED_DIR).glob("*.safetensors"))


class FSDPStrategy:
    """Shards a Trainer's :class:`LossStep` (and EMA copy) in place; saves, loads and gathers them."""

    def __init__(self, train_step: nn.Module, ema: Any, precision: str, device: torch.device, replica: bool):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # lazy: torch.distributed may be absent

        ensure_process_group(device)
        self.model, self.ema = train_step.model, ema
        # a plain copy to evaluate in (rank 0): the sharded model runs forward only on every rank at once
        self.replica = copy.deepcopy(self.model) if replica else None
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if precision == "bf16" else MixedPrecisionPolicy())
        for unit in shard_units(self.model):
            fully_shard(unit, mp_policy=policy)
        fully_shard(train_step, mp_policy=policy)
        if ema is not None:  # the same layout as the live model, so the EMA update is shard by shard
            for unit in shard_units(ema.module):
                fully_shard(unit)
            fully_shard(ema.module)

    # ------------------------------------------------------------------ full weights
    @staticmethod
    def full_state_dict(module: nn.Module) -> Dict[str, torch.Tensor]:
        """Every parameter and buffer in full, on rank 0's CPU ({} on other ranks). Collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # lazy: as above
        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def eval_module(self, module: nn.Module) -> Optional[nn.Module]:
        """Rank 0's plain copy holding ``module``'s full weights (None elsewhere). Collective."""
        state = self.full_state_dict(module)
        if self.replica is None:
            return None
        self.replica.load_state_dict(state)
        return self.replica

    @staticmethod
    def plain(t: torch.Tensor) -> torch.Tensor:
        """A DTensor (a gradient norm over shards) as an ordinary tensor."""
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    def params_norm_sum(self) -> torch.Tensor:
        """Sum over ranks of this rank's shards' norms: finite iff every parameter is. Collective."""
        local = [_local(p.detach()) for p in self.model.parameters()]
        norms = torch._foreach_norm([t for t in local if t.numel()])
        total = torch.stack([n.float() for n in norms]).sum() if norms else torch.zeros(())
        return all_reduce_sum(total)

    # ------------------------------------------------------------------ checkpoints
    def _tensors(self, optimizer) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
        from torch.distributed.checkpoint.state_dict import get_state_dict, get_model_state_dict  # lazy: as above
        model_sd, optim_sd = get_state_dict(self.model, optimizer)
        state = {"model": model_sd, "optim": optim_sd["state"]}
        if self.ema is not None:
            state["ema"] = get_model_state_dict(self.ema.module)
        return state, optim_sd["param_groups"]

    def save(self, ckpt_dir: Path, optimizer, rank: int, **fields: Any) -> Path:
        """Write the sharded checkpoint (collective: every rank writes its shards, rank 0 the rest)."""
        from torch.distributed.checkpoint import HuggingFaceStorageWriter, save  # lazy: as above
        tmp = begin_checkpoint(ckpt_dir) if rank == 0 else None
        tmp = Path(_broadcast_text(str(tmp) if tmp is not None else ""))
        try:
            state, groups = self._tensors(optimizer)
            save(state, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDED_DIR), save_distributed=True))
            dist.barrier()
            fault_point("ckpt_write")
            if rank == 0:
                write_json(tmp / OPTIMIZER_JSON, {"class": type(optimizer).__name__,
                                                  "param_groups": json.loads(json.dumps(groups))})
                checksums = {OPTIMIZER_JSON: file_sha256(tmp / OPTIMIZER_JSON)}
                for f in _sharded_files(tmp):
                    checksums[f"{SHARDED_DIR}/{f.name}"] = file_sha256(f)
                finish_checkpoint(tmp, ckpt_dir, checksums, has_ema=self.ema is not None, has_optimizer=True,
                                  layout={"sharded": SHARDED_DIR, "strategy": "fsdp"}, **fields)
        except BaseException:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Path(ckpt_dir)

    def load(self, ckpt: Path, optimizer, rank: int) -> Dict[str, Any]:
        """Restore model, optimizer, EMA and this rank's RNG from a sharded checkpoint; returns state.json."""
        from torch.distributed.checkpoint import HuggingFaceStorageReader, load  # lazy: as above
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict  # lazy: as above
        state = read_json(ckpt / STATE_FILE)
        if state.get("sharded") != SHARDED_DIR:
            raise CheckpointMismatchError(f"{ckpt} is not a sharded checkpoint (written with train.strategy=ddp); "
                                          "resume it with train.strategy=ddp")
        checksums = state.get("checksums") or {}
        where = f"in {ckpt / STATE_FILE}"
        names = {f"{SHARDED_DIR}/{f.name}" for f in _sharded_files(ckpt)} | {OPTIMIZER_JSON}
        missing = sorted(set(checksums) - names - {"rng.safetensors"})
        if missing:
            raise CheckpointMismatchError(f"{ckpt} lacks {', '.join(missing)} listed {where}")
        for name in sorted(names):  # every rank reads the shards it needs: check them all first
            check_sha256(ckpt / name, file_sha256(ckpt / name), checksums.get(name), where)
        tensors, _ = self._tensors(optimizer)
        if self.ema is not None and not state.get("has_ema"):
            raise CheckpointMismatchError(f"{ckpt} has no EMA weights but train.ema is on; resume with train.ema=0")
        try:
            load(tensors, storage_reader=HuggingFaceStorageReader(str(ckpt / SHARDED_DIR)))
        except Exception as exc:  # DCP wraps a missing key or a shape mismatch in its own error
            raise CheckpointMismatchError(f"{ckpt / SHARDED_DIR} does not fit this model and optimizer "
                                          f"(saved from another config?): {str(exc).splitlines()[0]}") from None
        groups = read_json(ckpt / OPTIMIZER_JSON)["param_groups"]
        for g in groups:
            g["betas"] = tuple(g["betas"])
        set_state_dict(self.model, optimizer, model_state_dict=tensors["model"],
                       optim_state_dict={"state": tensors["optim"], "param_groups": groups})
        if self.ema is not None:
            set_model_state_dict(self.ema.module, tensors["ema"])
        restore_rng_of_rank(ckpt, state, rank)
        return state


def _broadcast_text(text: str, size: int = 4096) -> str:
    """Rank 0's string on every rank (the temp directory all ranks write into)."""
    data = torch.zeros(size, dtype=torch.uint8)
    raw = text.encode()[:size]
    data[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    if dist.get_backend() == "nccl":
        data = data.cuda()
    dist.broadcast(data, src=0)
    return bytes(data.cpu().tolist()).rstrip(b"\0").decode()


__all__ = ["FSDPStrategy", "SHARDED_DIR", "ensure_process_group", "shard_units"]
