"""Config -> (task, order, objective, model) -> trained run directory -> decoded, measured results.

The Python API the CLI wraps: ``train(load_config(path, overrides))`` -> run directory,
``evaluate(load_run(run_dir), {"name": "margin", "k": 2}, n=256)`` -> metrics. Wiring only: the task hands out data, the order lays out a training pass, the
objective (named by the task or the order) turns both into a model, a loss and metrics, and the
:class:`~anyorder.train.Trainer` runs the loop. A run directory holds ``config.yaml`` (the
resolved config), ``run.json`` (versions, seed, hardware), ``metrics.jsonl``, ``checkpoint/``
(exact resume), ``model.safetensors`` and ``summary.json``.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from .analysis.flops import count_step_flops
from .checks import check_config, check_size
from .config import dump, normalise, read_yaml
from .decoding import build_decoder
from .evaluation.decode import run_decoder  # noqa: F401  (part of this module's API)
from .objectives import Objective, build_objective
from .orders import Order, build_order
from . import plugins as plugins_
from .rundir import check_run_name, discard_if_empty, open_run_dir, run_dir_for
from .tasks import Task, build_task
from .train import Trainer, TrainConfig, barrier, cleanup, load_weights, save_weights
from .train.guard import finished_summary


@dataclass
class Experiment:
    cfg: Dict[str, Any]
    task: Task
    order: Order
    objective: Objective
    model: torch.nn.Module

    @property
    def weighting(self) -> str:
        return self.objective.weighting


def step_generator(seed: int, step: int, micro: int = 0, rank: int = 0) -> torch.Generator:
    """Every random draw of a training step comes from (seed, step, micro, rank): resuming at any
    step replays exactly the batches and masks an uninterrupted run would have drawn."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + micro) * 1_013 + rank)


def build(cfg: Dict[str, Any], config_dir: Optional[Union[str, Path]] = None, *, plugins: bool = True,
          meta: bool = False, training: bool = True) -> Experiment:
    """Build everything a config names, validating it all before any file is written. Imports the
    config's plugins (relative paths: against ``config_dir``, then the current directory) unless
    ``plugins=False``; builds the model only once its size is known to fit (for training, unless
    ``force_size``); ``meta=True`` builds it without memory (validation only)."""
    cfg = normalise(cfg)
    check_config(cfg)
    if plugins:
        plugins_.load_plugins(cfg.get("plugins"), config_dir)
    task = build_task(cfg["task"])
    order = build_order(cfg["order"])
    objective = build_objective(task, order, cfg["weighting"], cfg.get("objective"))
    for d in cfg["decode"]:
        build_decoder(dict(d))
    batch = cfg.get("train", {}).get("batch_size", TrainConfig.batch_size) if training else None  # None: weights only
    check_size(objective, cfg["model"], batch, cfg.get("force_size", False))
    if training:  # after the cheap checks: making the data can take seconds
        task.prepare()
    torch.manual_seed(int(cfg["seed"]))
    with torch.device("meta") if meta else contextlib.nullcontext():
        return Experiment(cfg, task, order, objective, objective.build_model(dict(cfg["model"])))


def make_loss_fn(exp: Experiment):
    """The Trainer's ``loss_fn(model, step, micro, rank, world_size)``: one micro-batch of the
    objective, every random draw from :func:`step_generator`."""
    bs, seed = int(exp.cfg["train"]["batch_size"]), int(exp.cfg["seed"])

    def loss_fn(model, step, micro, rank, world_size):
        return exp.objective.loss(model, bs, step_generator(seed, step, micro, rank), step)

    return loss_fn


def make_eval_fn(exp: Experiment):
    """Periodic evaluation: the objective's held-out metrics with the first configured decoder."""
    return exp.objective.validation(min(int(exp.cfg["eval"]["n"]), 256), exp.cfg["decode"][0])


def step_flops(exp: Experiment, loss_fn, tcfg) -> int:
    """Training FLOPs of one optimizer step over all processes, counted on a real micro-step
    (the shapes, hence the FLOPs, are the same every step)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro = count_step_flops(exp.model, lambda m: loss_fn(m, 0, 0, 0, world)[0])
    return micro * tcfg.grad_accum * world


def train_config(cfg: Dict[str, Any], **changes):
    """(TrainConfig, flops_budget) of a resolved config; a budget is resolved into steps once the
    step's FLOPs are counted (:func:`steps_for_budget`)."""
    train_cfg = {k: (tuple(v) if k == "betas" and isinstance(v, list) else v) for k, v in cfg["train"].items()}
    flops_budget = train_cfg.pop("flops_budget", None)
    return TrainConfig(seed=int(cfg["seed"]), **{**train_cfg, **changes}), flops_budget


def steps_for_budget(flops_budget, flops_per_step: float) -> int:
    """Optimizer steps that fit a training-FLOP budget (at least one)."""
    budget = float(flops_budget)
    if not budget > 0:
        raise ValueError(f"train.flops_budget must be a positive number of FLOPs, got {flops_budget!r}")
    return max(1, int(budget // float(flops_per_step)))


def save_final_weights(trainer: Trainer) -> None:
    """``model.safetensors`` (the EMA weights when EMA is on), written before the final evaluation."""
    state = trainer.consolidated_state_dict()  # under FSDP a collective gather to rank 0
    if trainer.is_main:  # under torchrun only rank 0 writes
        save_weights(state, trainer.run_dir / "model.safetensors")


def train(cfg: Dict[str, Any], run_dir: Optional[Union[str, Path]] = None, resume: bool = True,
          config_dir: Optional[Union[str, Path]] = None) -> Path:
    """Train (or resume) the run of ``cfg`` in ``run_dir`` (default ``out_dir/name``); returns it.
    ``config_dir``: the directory of the config file, which relative plugin paths resolve against.

    A finished run is left as it is. ``resume=False`` refuses a directory that already holds a run.
    Nothing is created before the config (run name included) is valid; a failure deletes only a
    directory this call created that holds no results (no checkpoint, weights or metrics rows).
    """
    exp = build(cfg, config_dir)                       # all validation happens here, before mkdir
    check_run_name(exp.cfg.get("name"))
    tcfg, flops_budget = train_config(exp.cfg)
    run_dir = Path(run_dir) if run_dir is not None else run_dir_for(exp.cfg)
    info = {"config": exp.cfg, "task": exp.task.describe(), "order": exp.order.describe(),
            "model_params": sum(p.numel() for p in exp.model.parameters()), "weighting": exp.weighting}
    loss_fn = make_loss_fn(exp)
    flops = step_flops(exp, loss_fn, tcfg)
    info["flops_per_step"] = flops
    if flops_budget is not None:  # equal-compute comparisons: the step count follows the step's cost
        tcfg.steps = steps_for_budget(flops_budget, flops)
        info["steps_from_flops_budget"] = tcfg.steps
    main = int(os.environ.get("RANK", "0") or 0) == 0  # under torchrun rank 0 owns the directory
    lock, created = open_run_dir(run_dir, exp.cfg, resume) if main else (None, False)
    try:
        done = finished_summary(run_dir)
        if done is not None and int(done.get("step", -1)) >= tcfg.steps:
            if main:
                print(f"{run_dir} is finished (step {done['step']}, summary.json); nothing to do", flush=True)
            return run_dir
        if main:
            (run_dir / "config.yaml").write_text(dump(exp.cfg))
            plugins_.record(run_dir, exp.cfg.get("plugins"), config_dir)  # plugins.json: the absolute paths
        trainer = Trainer(exp.model, loss_fn, tcfg, run_dir, eval_fn=make_eval_fn(exp), run_info=info,
                          flops_per_step=flops, lr_scale=exp.objective.lr_scale(tcfg.lr),
                          on_trained=save_final_weights)
        trainer.fit()  # writes summary.json once the final evaluation is done
    except BaseException:
        if lock is not None and created:
            discard_if_empty(run_dir, lock)  # a run that never trained leaves nothing behind
            lock = None
        raise
    finally:
        if lock is not None:
            lock.release()
    barrier()
    cleanup()  # a rank that exits with a live process group aborts (gloo)
    return run_dir


def load_run(run_dir: Union[str, Path], plugins=None, trust_plugins: Optional[bool] = None) -> Experiment:
    """A trained run, ready to decode. Imports no plugin its config lists unless asked: ``plugins``
    are imported instead (the user's own, e.g. ``["examples/right_to_left.py"]``), or with
    ``trust_plugins=True`` exactly those the run lists; a listed plugin not imported in this
    process is otherwise refused (:class:`anyorder.plugins.PluginsNotAllowed`)."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = read_yaml(cfg_path.read_text(errors="replace"), f"run config {str(cfg_path)!r}")
    plugins_.for_run(run_dir, cfg.get("plugins"), plugins, trust_plugins)
    exp = build(cfg, plugins=False, training=False)
    weights = run_dir / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{run_dir} has no model.safetensors (training not finished? "
                                f"`anyorder train` resumes it from checkpoint/)")
    load_weights(exp.model, weights)
    exp.model.eval()
    return exp


def evaluate(exp: Experiment, decoder_spec, n: int = 256, batch_size: int = 256, return_results: bool = False):
    """The task's metrics on ``n`` held-out examples decoded with ``decoder_spec``, plus AFP,
    Kendall τ and NFE (the run's objective decides how a prediction is decoded)."""
    return exp.objective.evaluate(exp.model, decoder_spec, n, batch_size, return_results)
