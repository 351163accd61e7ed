"""What ran where: library versions and ``run.json`` (config, host, devices, command line, resumes)."""
from __future__ import annotations

import os
import platform
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from .config import TrainConfig
from .distributed import DistInfo
from .files import read_json, replace_json

RUN_FILE = "run.json"


def versions() -> Dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}


def write_run_json(
    run_dir: Path,
    cfg: TrainConfig,
    dist: DistInfo,
    *,
    resumed_from: Optional[int],
    run_info: Dict[str, Any],
    num_params: int,
    flops_per_step: Optional[float],
) -> None:
    """Write ``run_dir/run.json`` at the first start; a resume only appends a note to it.

    (Without a checkpoint the run starts over, and so does run.json.)
    """
    path = run_dir / RUN_FILE
    now = time.time()
    if path.exists() and resumed_from is not None:
        info = read_json(path)
        info.setdefault("resumes", []).append(
            {
                "time": now,
                "time_iso": datetime.fromtimestamp(now, timezone.utc).isoformat(),
                "step": resumed_from,
                "hostname": socket.gethostname(),
                "world_size": dist.world_size,
                "config": cfg.to_dict(),
            }
        )
    else:
        info = {
            "run_info": run_info,
            "config": cfg.to_dict(),
            "config_hash": cfg.hash(),
            "seed": cfg.seed,
            "versions": versions(),
            "hostname": socket.gethostname(),
            "cpu_count": os.cpu_count(),
            "cuda_device": torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else None,
            "device": str(dist.device),
            "world_size": dist.world_size,
            "backend": dist.backend,
            "num_params": num_params,
            "flops_per_step": flops_per_step,
            "start_time": now,
            "start_time_iso": datetime.fromtimestamp(now, timezone.utc).isoformat(),
            "argv": sys.argv,
            "resumed_from": resumed_from,
        }
    replace_json(path, info)


__all__ = ["RUN_FILE", "versions", "write_run_json"]
