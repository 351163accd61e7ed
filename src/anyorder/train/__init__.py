"""Training: config, lr schedule, checkpoints, loggers, torchrun helpers and the Trainer loop."""
from .checkpoint import (
    CheckpointMismatchError,
    capture_rng_state,
    find_checkpoint,
    load_checkpoint,
    load_weights,
    restore_rng_state,
    save_checkpoint,
    save_weights,
    unwrap,
)
from .config import PRECISIONS, TrainConfig
from .distributed import DistInfo, all_reduce_mean, all_reduce_sum, barrier, cleanup, init_distributed, is_distributed
from .ema import EMA
from .loggers import JsonlLogger, Loggers, TensorBoardLogger, WandbLogger, build_loggers
from .schedule import lr_multiplier
from .trainer import EvalFn, LossFn, Trainer

__all__ = [
    "TrainConfig",
    "PRECISIONS",
    "lr_multiplier",
    "Trainer",
    "LossFn",
    "EvalFn",
    "EMA",
    "save_checkpoint",
    "load_checkpoint",
    "find_checkpoint",
    "save_weights",
    "load_weights",
    "CheckpointMismatchError",
    "capture_rng_state",
    "restore_rng_state",
    "unwrap",
    "JsonlLogger",
    "TensorBoardLogger",
    "WandbLogger",
    "Loggers",
    "build_loggers",
    "DistInfo",
    "init_distributed",
    "is_distributed",
    "barrier",
    "cleanup",
    "all_reduce_mean",
    "all_reduce_sum",
]
