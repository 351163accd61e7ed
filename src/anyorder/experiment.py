"""Config -> (task, order, model) -> trained run directory -> decoded, measured results.

The Python API the CLI wraps:

    cfg = load_config("configs/sudoku4.yaml", ["order.name=ar"])
    run_dir = train(cfg)                       # runs/<name>/ with weights, metrics, config
    exp = load_run(run_dir)
    table = evaluate(exp, {"name": "margin", "k": 2}, n=256)

A run directory holds ``config.yaml`` (the resolved config), ``run.json`` (versions, seed,
hardware), ``metrics.jsonl``, ``checkpoint/`` (exact resume) and ``model.safetensors``.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
import yaml

from .config import dump, normalise
from .decoding import DecodeResult, build_decoder
from .model import ModelConfig, Transformer
from .objectives.nelbo import WEIGHTINGS, plan_loss
from .orders import Order, build_order
from .registry import unknown_choice
from .tasks import Task, build_task


@dataclass
class Experiment:
    cfg: Dict[str, Any]
    task: Task
    order: Order
    model: Transformer
    weighting: str


def step_generator(seed: int, step: int, micro: int = 0, rank: int = 0) -> torch.Generator:
    """Every random draw of a training step comes from (seed, step, micro, rank): resuming at any
    step replays exactly the batches and masks an uninterrupted run would have drawn."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + micro) * 1_013 + rank)


def load_plugins(plugins) -> None:
    """Import user modules (dotted names) or files (paths ending in .py) so that their
    ``@ORDERS.register(...)``-style decorators run before the config is resolved."""
    import importlib
    import importlib.util

    for item in plugins or []:
        item = str(item)
        if item.endswith(".py"):
            path = Path(item)
            if not path.exists():
                raise FileNotFoundError(f"plugin file {item!r} does not exist")
            name = f"anyorder_plugin_{path.stem}"
            if name in __import__("sys").modules:
                continue
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            __import__("sys").modules[name] = module
            spec.loader.exec_module(module)
        else:
            importlib.import_module(item)


def build(cfg: Dict[str, Any]) -> Experiment:
    """Build everything a config names, validating it all before any file is written."""
    cfg = normalise(cfg)
    load_plugins(cfg.get("plugins"))
    task = build_task(cfg["task"])
    order = build_order(cfg["order"])
    weighting = cfg["weighting"] or order.default_weighting
    if weighting not in WEIGHTINGS:
        raise unknown_choice("weighting", weighting, list(WEIGHTINGS))
    for d in cfg["decode"]:
        build_decoder(dict(d))
    torch.manual_seed(int(cfg["seed"]))
    if getattr(task, "continuous", False):  # in-context regression: read-in/read-out, MSE
        from .model.continuous import ContinuousConfig, ContinuousTransformer
        from .objectives.regression import REGRESSION_WEIGHTINGS

        if weighting not in REGRESSION_WEIGHTINGS:
            raise unknown_choice("regression weighting", weighting, list(REGRESSION_WEIGHTINGS))
        fields = ContinuousConfig.__dataclass_fields__
        mcfg = ContinuousConfig(d_in=task.d, max_len=task.seq_len,
                                **{k: v for k, v in cfg["model"].items() if k in fields})
        return Experiment(cfg, task, order, ContinuousTransformer(mcfg), weighting)
    mcfg = ModelConfig(vocab_size=task.vocab_size, mask_id=task.mask_id, max_len=task.seq_len,
                       extra_embeddings=dict(task.extra_embeddings), **cfg["model"])
    model = Transformer(mcfg)
    if getattr(order, "learned", False):  # LoMDM: the backbone plus the g_φ / g_ψ schedule heads
        model = order.wrap(model)
    return Experiment(cfg, task, order, model, weighting)


def make_loss_fn(exp: Experiment):
    extra = exp.task.extra()
    bs, seed = int(exp.cfg["train"]["batch_size"]), int(exp.cfg["seed"])
    if getattr(exp.task, "continuous", False):
        from .objectives.regression import make_regression_loss_fn
        return make_regression_loss_fn(exp.task, exp.order, exp.weighting, bs, seed)

    def loss_fn(model, step, micro, rank, world_size):
        gen = step_generator(seed, step, micro, rank)
        x0, answer = exp.task.train_batch(bs, gen)
        if getattr(exp.order, "learned", False):  # LoMDM: three passes (x, z¹, z²), RLOO for φ
            loss, stats = model(x0, extra=extra, train_answer=answer, gen=gen)  # via forward: DDP-safe
            stats = {k: float(v) for k, v in stats.items()}
            stats["tokens"] = 3 * int(x0.numel())
            return loss, stats
        plan = exp.order.train_plan(x0, exp.order.layout(answer), exp.task.mask_id, gen)
        loss, stats = plan_loss(model, plan, extra=extra, weighting=exp.weighting)
        stats["tokens"] = int(plan.tokens.numel())
        return loss, stats

    return loss_fn


def make_eval_fn(exp: Experiment):
    """Held-out masked CE (fixed masks) and the first decoder's task metrics on a subset."""
    n = min(int(exp.cfg["eval"]["n"]), 256)
    if getattr(exp.task, "continuous", False):
        from .objectives.regression import make_regression_eval_fn
        fn = make_regression_eval_fn(exp.task, exp.order, n)
        return lambda model: {k: float(v) for k, v in fn(model).items() if isinstance(v, (int, float))}
    x0, answer = exp.task.eval_set(n)
    extra = exp.task.extra()

    def eval_fn(model):
        gen = torch.Generator().manual_seed(12345)
        if getattr(exp.order, "learned", False):
            _, stats = model.loss(x0, answer, gen, extra=extra)
            out = {"val_nelbo_per_token": float(stats["nelbo"]), "val_masked_acc": float(stats["masked_acc"])}
        else:
            plan = exp.order.train_plan(x0, exp.order.layout(answer), exp.task.mask_id, gen)
            loss, stats = plan_loss(model, plan, extra=extra, weighting="elbo")
            out = {"val_nelbo_per_token": float(loss), "val_masked_acc": stats["masked_acc"]}
        res = run_decoder(model, exp, exp.cfg["decode"][0], x0[:128], answer[:128])
        out.update({f"val_{k}": v for k, v in res.items() if isinstance(v, float)})
        return out

    return eval_fn


def step_flops(exp: Experiment, loss_fn, tcfg) -> int:
    """Training FLOPs of one optimizer step over all processes, counted on a real micro-step
    (the shapes, hence the FLOPs, are the same every step)."""
    import os

    from .analysis.flops import count_step_flops

    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro = count_step_flops(exp.model, lambda m: loss_fn(m, 0, 0, 0, world)[0])
    return micro * tcfg.grad_accum * world


def train_config(cfg: Dict[str, Any], **changes):
    """(TrainConfig, flops_budget) of a resolved config; a budget is resolved into steps once the
    step's FLOPs are counted (:func:`steps_for_budget`)."""
    from .train import TrainConfig

    train_cfg = {k: (tuple(v) if k == "betas" else v) for k, v in cfg["train"].items()}
    flops_budget = train_cfg.pop("flops_budget", None)
    return TrainConfig(seed=int(cfg["seed"]), **{**train_cfg, **changes}), flops_budget


def steps_for_budget(flops_budget, flops_per_step: float) -> int:
    """Optimizer steps that fit a training-FLOP budget (at least one)."""
    budget = float(flops_budget)
    if not budget > 0:
        raise ValueError(f"train.flops_budget must be a positive number of FLOPs, got {flops_budget!r}")
    return max(1, int(budget // float(flops_per_step)))


def run_dir_for(cfg) -> Path:
    return Path(cfg["out_dir"]) / str(cfg["name"])


def train(cfg: Dict[str, Any], run_dir: Optional[Union[str, Path]] = None, resume: bool = True) -> Path:
    from .train import Trainer

    exp = build(cfg)                                   # all validation happens here, before mkdir
    tcfg, flops_budget = train_config(exp.cfg)
    run_dir = Path(run_dir) if run_dir is not None else run_dir_for(exp.cfg)
    created = not run_dir.exists()
    if not created:
        old = run_dir / "config.yaml"
        if old.exists() and resume:
            prev = yaml.safe_load(old.read_text())
            if _trajectory(prev) != _trajectory(exp.cfg):
                raise ValueError(f"{run_dir} holds a run with a different config; choose another name= "
                                 f"or delete the directory (differences: {_diff(prev, exp.cfg)})")
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        (run_dir / "config.yaml").write_text(dump(exp.cfg))
        info = {"config": exp.cfg, "task": exp.task.describe(), "order": exp.order.describe(),
                "model_params": sum(p.numel() for p in exp.model.parameters()), "weighting": exp.weighting}
        loss_fn = make_loss_fn(exp)
        flops = step_flops(exp, loss_fn, tcfg)
        info["flops_per_step"] = flops
        if flops_budget is not None:  # equal-compute comparisons: the step count follows the step's cost
            tcfg.steps = steps_for_budget(flops_budget, flops)
            info["steps_from_flops_budget"] = tcfg.steps
        lr_scale = None
        if getattr(exp.order, "learned", False) and exp.order.head_lr is not None:  # LoMDM heads' own lr
            head_scale = exp.order.head_lr / tcfg.lr
            lr_scale = lambda name: head_scale if exp.model.is_head(name) else 1.0  # noqa: E731
        trainer = Trainer(exp.model, loss_fn, tcfg, run_dir, eval_fn=make_eval_fn(exp), run_info=info,
                          flops_per_step=flops, lr_scale=lr_scale)
        summary = trainer.fit()
    except Exception:
        if created and not (run_dir / "checkpoint").exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing worth keeping: leave no half-made run
        raise
    from .train import barrier, cleanup, save_weights
    if trainer.is_main:  # under torchrun only rank 0 writes
        save_weights(trainer.ema.module if trainer.ema is not None else trainer.model, run_dir / "model.safetensors")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    barrier()
    cleanup()  # a rank that exits with a live process group aborts (gloo)
    return run_dir


def _trajectory(cfg):
    """The parts of a config that change what training computes."""
    c = json.loads(json.dumps(cfg))
    for k in ("name", "out_dir", "eval", "decode"):
        c.pop(k, None)
    for k in ("steps", "eval_every", "checkpoint_every", "log_every", "progress", "tensorboard", "wandb", "wandb_project"):
        c.get("train", {}).pop(k, None)
    return c


def _diff(a, b, path=""):
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{path}{k}.")
        elif va != vb:
            out.append(f"{path}{k}: {va!r} -> {vb!r}")
    return "; ".join(out[:6]) if path == "" else out


def load_run(run_dir: Union[str, Path]) -> Experiment:
    from .train import load_weights

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    exp = build(yaml.safe_load(cfg_path.read_text()))
    weights = run_dir / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{run_dir} has no model.safetensors (training not finished? "
                                f"`anyorder train` resumes it from checkpoint/)")
    load_weights(exp.model, weights)
    exp.model.eval()
    return exp


def run_decoder(model, exp: Experiment, decoder_spec, x0, answer, batch_size: int = 256,
                return_results: bool = False):
    """Decode ``x0``'s answers from scratch; task metrics + AFP, Kendall τ, NFE."""
    dec = build_decoder(dict(decoder_spec) if isinstance(decoder_spec, dict) else decoder_spec)
    extra = exp.task.extra()
    mask_id = exp.task.mask_id
    toks, traces = [], []
    t0 = time.perf_counter()
    for i in range(0, len(x0), batch_size):
        xb, ab = x0[i:i + batch_size], answer[i:i + batch_size]
        prompt = torch.where(ab, torch.full_like(xb, mask_id), xb)
        r = dec.decode(model, exp.order, prompt, ab, extra=extra, row_seeds=[dec.seed + j for j in range(i, i + len(xb))])
        toks.append(r.tokens)
        traces.append(r.trace)
    secs = time.perf_counter() - t0
    pred = torch.cat(toks)
    from .decoding.trace import Trace
    trace = Trace(*(torch.cat([getattr(t, f) for t in traces]) for f in ("finalize_step", "confidence", "answer", "nfe")))
    out = dict(exp.task.metrics(pred, x0, answer))
    out.update(trace.summary())
    out["tokens_per_s"] = float(answer.sum()) / secs
    if return_results:
        return out, DecodeResult(pred, trace)
    return out


def evaluate(exp: Experiment, decoder_spec, n: int = 256, batch_size: int = 256, return_results: bool = False):
    if getattr(exp.task, "continuous", False):  # no token decoder: the order's own prediction loop
        from .objectives.regression import make_regression_eval_fn
        res = {k[len("val_"):]: v for k, v in make_regression_eval_fn(exp.task, exp.order, n)(exp.model).items()
               if isinstance(v, (int, float))}
        return (res, None) if return_results else res
    x0, answer = exp.task.eval_set(n)
    return run_decoder(exp.model, exp, decoder_spec, x0, answer, batch_size, return_results)
