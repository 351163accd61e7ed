"""Training: config, lr schedule, checkpoints, RNG state, loggers, torchrun helpers and the Trainer loop."""
from .checkpoint import find_checkpoint, load_checkpoint, load_weights, save_checkpoint, save_weights
from .config import PRECISIONS, TrainConfig
from .distributed import (
    DistInfo,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    cleanup,
    init_distributed,
    is_distributed,
    unwrap,
)
from .ema import EMA
from .files import CheckpointMismatchError, CorruptFileError
from .loggers import JsonlLogger, Loggers, TensorBoardLogger, WandbLogger, build_loggers
from .rng import capture_rng_state, restore_rng_state
from .schedule import lr_multiplier
from .nonfinite import NonFiniteError
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
    "CorruptFileError",
    "NonFiniteError",
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
