"""What a resumed run reconciles with its checkpoint: a changed config or world size (warned:
the result is no longer bit-exact) and the optimizer's stored hyper-parameters (the config wins)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict


def reconcile_resumed(state: Dict[str, Any], cfg, world_size: int, optimizer, ckpt: Path) -> None:
    step = int(state["step"])
    saved_cfg = state.get("config") or {}
    if state.get("config_hash") not in (None, cfg.hash()):
        now = cfg.dynamics_dict()
        changed = sorted(k for k in now if saved_cfg.get(k) != now[k])
        warnings.warn(
            f"resuming from {ckpt} with a different config ({', '.join(changed)}); training continues "
            "but will not match an uninterrupted run with either config"
        )
    if state.get("world_size") not in (None, world_size):
        warnings.warn(
            f"checkpoint was saved with world size {state['world_size']}, resuming with {world_size}: "
            "batches differ from the original run, so the result is not bit-exact"
        )
    # The config wins over hyper-parameters stored with the optimizer state (lr is set per step).
    for g in optimizer.param_groups:
        g["weight_decay"] = cfg.weight_decay if g.get("decay", True) else 0.0
        g["betas"] = cfg.betas
    if step > cfg.steps:
        warnings.warn(f"checkpoint is at step {step}, past cfg.steps={cfg.steps}; nothing to do")
