"""Value checks: every error is one line that names the key, the value and what is accepted.

Configs come from YAML and the command line, so a value may be of any type: ``1.5`` where an
integer goes, ``.nan`` where a probability goes, a list where a number goes. Each check here
returns the value converted (an integer, a finite float) or raises a ``ValueError`` such as

    model.d_model must be an integer >= 1, got 0

The config checks (:func:`check_config`) and the size estimate (:func:`check_size`) run before
anything is allocated or any run directory is made.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, Iterable, Optional

import torch

# seed ceiling: every training step's generator is seeded from
# ((seed * 1_000_003 + step) * 1_009 + micro) * 1_013 + rank, which must stay below 2**64
MAX_SEED = 2 ** 24 - 1


def show(value: Any, limit: int = 60) -> str:
    """``repr(value)``, shortened to ``limit`` characters (one line: repr escapes newlines)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_number(x: Any) -> bool:
    """A finite real number (bool is an int subclass, but ``true`` is not a number)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def range_text(lo=None, hi=None, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return ""


def _pad(text: str) -> str:
    return f" {text}" if text else ""


def in_range(v, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False) -> bool:
    return not ((lo is not None and (v <= lo if lo_open else v < lo)) or
                (hi is not None and (v >= hi if hi_open else v > hi)))


def check_int(key: str, value: Any, lo: Optional[int] = None, hi: Optional[int] = None,
              optional: bool = False, note: str = "") -> Optional[int]:
    """``value`` as an int in [lo, hi]. A whole float (``1e4`` from YAML) counts; ``1.5``, a bool
    or a string does not. ``optional``: None passes (as None)."""
    if value is None and optional:
        return None
    v = int(value) if isinstance(value, float) and value.is_integer() else value
    if isinstance(v, int) and not isinstance(v, bool) and not -2 ** 63 <= v < 2 ** 63:
        note += " (and a 64-bit integer)"
        v = None
    if not isinstance(v, int) or isinstance(v, bool) or not in_range(v, lo, hi):
        if isinstance(value, str) and _as_number(value) is not None:
            note += " (YAML reads 1e6 as a string: write 1000000 or 1.0e+6)"
        raise ValueError(f"{key} must be an integer{_pad(range_text(lo, hi))}{note}, got {show(value)}")
    return v


def check_float(key: str, value: Any, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False,
                optional: bool = False, note: str = "") -> Optional[float]:
    """``value`` as a finite float in the range (NaN and ±inf never pass). A numeric string
    passes: YAML reads ``3e-4`` (no dot) as a string."""
    if value is None and optional:
        return None
    v = value
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            pass
    if not is_number(v) or not in_range(v, lo, hi, lo_open, hi_open):
        raise ValueError(f"{key} must be a finite number{_pad(range_text(lo, hi, lo_open, hi_open))}{note}, "
                         f"got {show(value)}")
    return float(v)


def check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {show(value)}")
    return value


def check_choice(key: str, value: Any, choices: Iterable[str]) -> str:
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(map(repr, choices))}, got {show(value)}")
    return value


def check_mapping(key: str, value: Any) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a mapping of keys to values, got {show(value)}")
    return value


# -- a whole config ----------------------------------------------------------------------------

def check_config(cfg: Dict[str, Any]) -> None:
    """The top-level values of a normalised config that no registered class checks: the seed,
    the run's name and folder, the evaluation sizes, the decoder list (each decoder's options are
    checked when it is built; model, task and order when they are built) and the train keys the
    model's size check reads. A key a partial config (the Python API) leaves out is not checked."""
    check_int("seed", cfg["seed"], 0, MAX_SEED)
    for key in ("name", "out_dir"):
        if key in cfg and (not isinstance(cfg[key], str) or not cfg[key].strip()):
            raise ValueError(f"{key} must be a non-empty string, got {show(cfg[key])}")
    for key, value in cfg.get("eval", {}).items():
        if key in ("n", "batch_size"):
            check_int(f"eval.{key}", value, 1)
    if not cfg["decode"]:
        raise ValueError("decode must name at least one decoder (the periodic and final evaluations use "
                         "decode[0]), got []")
    train = cfg.get("train", {})
    check_int("train.batch_size", train.get("batch_size", 1), 1)
    check_float("train.flops_budget", train.get("flops_budget"), 0, lo_open=True, optional=True)
    check_bool("force_size", cfg.get("force_size", False))


# -- memory --------------------------------------------------------------------------------------

def _as_number(value: Any) -> Optional[float]:
    try:
        v = float(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None
    except ValueError:
        return None
    return v if v is not None and math.isfinite(v) else None


def available_memory() -> int:
    """Bytes a run can still allocate: the memory of this process's GPU where training would use
    one (its total: asking for the free memory would open a CUDA context on it before training
    does), else the host's MemAvailable (``/proc/meminfo``; ``os.sysconf`` where there is none)."""
    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0") or 0) % torch.cuda.device_count()
        return int(torch.cuda.get_device_properties(index).total_memory)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.3g} GiB"


def check_memory(what: str, need: float, hint: str) -> None:
    """Refuse, before allocating, ``need`` bytes that exceed what the machine has."""
    have = available_memory()
    if need > have:
        raise ValueError(f"{what} needs about {gib(need)} but {gib(have)} is available; {hint}")


def training_bytes(params: int, batch: int, seq_len: int, d_model: int, n_layers: int, vocab: int) -> int:
    """A rough lower estimate of training memory: fp32 weights, gradients and two Adam moments
    (16 bytes a parameter), the activations kept for the backward pass (about 16 floats per token,
    layer and width) and the logits with their softmax and gradient (3 floats per token and
    vocabulary entry). Two-stream passes and attention maps come on top."""
    tokens = batch * seq_len
    return 16 * params + 4 * tokens * (16 * d_model * max(n_layers, 1) + 3 * vocab)


def check_size(objective, options: Dict[str, Any], batch: Optional[int], force: bool = False) -> int:
    """Parameters of the model ``objective.build_model(options)`` would make, counted on the meta
    device (nothing allocated), and a refusal if it would not fit: training it with micro-batches
    of ``batch`` (unless ``force``), or (``batch=None``, loading a run) its fp32 weights alone.
    Returns the parameter count."""
    d, layers, ratio = (_as_number(options.get(k)) for k in ("d_model", "n_layers", "mlp_ratio"))
    if all(v is not None and v > 0 for v in (d, layers, ratio)) and not force:
        # absurd sizes are refused before even the meta model is built (a loop over its layers)
        at_least = layers * d * d * (4 + 2 * ratio) / 2
        check_memory(f"a model of model.d_model={d:g}, model.n_layers={layers:g}, model.mlp_ratio={ratio:g} "
                     f"(at least {at_least:.3g} parameters)", (4 if batch is None else 16) * at_least,
                     "make the model smaller, or set force_size=true")
    try:
        with torch.device("meta"):
            model = objective.build_model(dict(options))
    except (RuntimeError, TypeError, OverflowError) as exc:  # a size torch cannot even represent
        raise ValueError(f"the model of these model options cannot be built: {str(exc).splitlines()[0]}") from exc
    params = sum(p.numel() for p in model.parameters())
    if batch is None:
        check_memory(f"loading this model ({params:,} parameters)", 4 * params, "it cannot be loaded here")
        return params
    task, batch = objective.task, int(batch)
    need = training_bytes(params, batch, int(task.seq_len), int(options.get("d_model", 1)),
                          int(options.get("n_layers", 1)), int(getattr(task, "vocab_size", 1)))
    if not force:
        check_memory(f"training this model ({params:,} parameters, batch {batch} x {task.seq_len} tokens)",
                     need, "make the model or train.batch_size smaller, or set force_size=true")
    return params
