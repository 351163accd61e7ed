"""The training loop.

Contract with the caller -- the reason exact resumption needs no data-loader state:

``loss_fn(model, step, micro, rank, world_size) -> (loss, metrics)``
    builds its own batch deterministically from (seed, step, micro, rank), runs the bare ``model``
    in any way it likes (several passes, sub-modules, heads) and returns a scalar loss plus a dict
    of extra metrics. Under DDP the whole ``loss_fn`` runs inside the ``forward`` of one small
    wrapper module (:class:`LossStep`), so DDP arms its gradient all-reduce whatever the loss calls. ``metrics["tokens"]``
    (int, tokens in this micro-batch) feeds tokens/s and ``tokens_seen``; other numeric entries are
    averaged and logged (the main process's values). Global RNG draws (dropout, random masking) are
    fine: the RNG state of every rank is checkpointed.

``eval_fn(model) -> {name: float}``
    called on the main process only, under ``torch.no_grad()``, on the EMA weights when EMA is on,
    with the global RNG forked so evaluation never perturbs training. Other ranks wait at a barrier.

A step is ``grad_accum`` micro-steps, then clip, AdamW, EMA. Step ``s`` (0-based) uses
``lr * lr_multiplier(s, ...)``; ``self.step`` counts completed steps, so a checkpoint at
``self.step == k`` holds the state right after update k-1 and resumes with update k.

The last step is checkpointed (and ``on_trained`` called) *before* the final evaluation, and a
resume redoes an evaluation cut short; signals, the lock and summary.json: ``guard.py``.
"""
from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from .checkpoint import CHECKPOINT_DIR, STATE_FILE, find_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import LossStep, all_reduce_sum, barrier, init_distributed, unwrap
from .recompute import enable_gradient_checkpointing
from .ema import EMA
from .faults import fault_point
from .fsdp import FSDPStrategy
from .files import replace_json
from .guard import (SUMMARY_FILE, SignalGuard, TrainingInterrupted, finished_at_resume, last_train_row, lock_run_dir,
                    save_on_interrupt)
from .loggers import Loggers, build_loggers, require_backends
from .metrics import LogWindow, eval_line, progress_postfix, train_line, unpack_loss, update_best
from .nonfinite import NonFiniteGuard
from .optim import build_adamw
from .precision import autocast as precision_autocast, resolve as resolve_precision
from .provenance import write_run_json
from .rng import capture_rng_state, forked_rng, gather_rng_states, seed_all
from .resume import reconcile_resumed
from .schedule import lr_multiplier

LossFn = Callable[[nn.Module, int, int, int, int], Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, Any]]]]
EvalFn = Callable[[nn.Module], Mapping[str, float]]


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        cfg: TrainConfig,
        run_dir: Union[str, Path],
        eval_fn: Optional[EvalFn] = None,
        run_info: Optional[Dict[str, Any]] = None,
        flops_per_step: Optional[float] = None,
        lr_scale: Optional[Callable[[str], float]] = None,
        on_trained: Optional[Callable[["Trainer"], None]] = None,
    ):
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.loss_fn = loss_fn
        self.eval_fn = eval_fn
        self.run_dir = Path(run_dir)
        self.run_info = dict(run_info or {})
        self.flops_per_step = flops_per_step
        # called on every rank after the last step's checkpoint, before the final evaluation
        self.on_trained = on_trained

        self.dist = init_distributed()
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.is_main = self.dist.is_main
        self.device = self.dist.device
        if self.is_main:
            require_backends(tensorboard=cfg.tensorboard, wandb=cfg.wandb)  # fail before any compute

        self.model = unwrap(model).to(self.device)
        # what "auto" chose and why goes into run.json (run_info.precision)
        self.precision = resolve_precision(cfg.precision, self.device, checkpoint_dir=self.checkpoint_dir)
        self.run_info["precision"] = self.precision
        # The EMA copy is made before any wrapping or sharding so it is a plain module.
        self.ema = EMA(self.model, cfg.ema) if cfg.ema > 0 else None
        # Under DDP/FSDP the loss runs in LossStep.forward: DDP all-reduces the gradients of whatever the loss
        # touched, FSDP gathers the root's parameters for it (sharding in place, before the optimizer exists).
        if cfg.gradient_checkpointing:  # before sharding: FSDP wraps the blocks that recompute
            enable_gradient_checkpointing(self.model)
        self.train_step: nn.Module = LossStep(self.model, loss_fn)
        self.fsdp: Optional[FSDPStrategy] = None
        if cfg.strategy == "fsdp":
            self.fsdp = FSDPStrategy(self.train_step, self.ema, self.precision["chosen"], self.device,
                                     replica=self.is_main and eval_fn is not None)
        elif self.world_size > 1:
            self.train_step = DDP(self.train_step, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no parameters with requires_grad=True; nothing to train")
        # Decay only matrices/embeddings, not biases, norm gains and scalars (decaying them only hurts).
        # ``lr_scale(name)`` gives some parameters their own learning rate (e.g. LoMDM's schedule
        # heads); groups are keyed by (decayed?, scale) in order of first appearance.
        buckets: Dict[Any, List[torch.nn.Parameter]] = {}
        for n, p in named:
            key = (p.dim() >= 2, float(lr_scale(n)) if lr_scale is not None else 1.0)
            buckets.setdefault(key, []).append(p)
        groups = [{"params": ps, "weight_decay": cfg.weight_decay if dec else 0.0, "decay": dec, "lr_scale": sc}
                  for (dec, sc), ps in buckets.items()]
        self.optimizer = build_adamw(groups, cfg.lr, cfg.betas, self.device)  # fused where torch has it
        self._params = [p for _, p in named]

        self.step = 0
        self.tokens_seen = 0
        self.best: Dict[str, Dict[str, float]] = {}
        self.last_metrics: Dict[str, Any] = {}
        self.last_eval: Dict[str, float] = {}
        self.loggers = Loggers([])
        self._pending_tokens = 0  # this rank's tokens not yet summed over ranks into tokens_seen
        self._in_update = False  # True while parameters are being modified (unsafe to checkpoint)
        self._saving = False
        self._rng_after_step: Optional[Dict[str, Any]] = None
        self._window = LogWindow(self.device, self.tokens_seen)
        # steps of the checkpoint on disk and of the last evaluation; the resumed step's evaluation was cut short
        self._saved_step, self._evaluated_step, self._eval_pending = None, None, False
        self._signals = SignalGuard()
        self.nonfinite = NonFiniteGuard(cfg, self.optimizer, self.world_size, self.is_main, self.checkpoint_dir)

    # ------------------------------------------------------------------ public
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR

    def fit(self) -> Dict[str, Any]:
        """Train to ``cfg.steps`` (resuming from ``run_dir/checkpoint``), evaluate, write summary.json."""
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        with lock_run_dir(self.run_dir, self.is_main, self.world_size, self.device), self._signals.installed():
            return self._fit()

    def _fit(self) -> Dict[str, Any]:
        cfg = self.cfg
        barrier()
        resumed_from = self._resume_or_seed()
        self._rng_after_step = capture_rng_state()
        done = finished_at_resume(self)
        if done is not None:
            return done  # a finished run is left as it is
        redo_eval = self.eval_fn is not None and (self._eval_pending or (resumed_from is not None and self.step >= cfg.steps))
        if self.is_main:
            write_run_json(self.run_dir, cfg, self.dist, resumed_from=resumed_from, run_info=self.run_info,
                           num_params=sum(p.numel() for p in self.model.parameters()),
                           flops_per_step=self.flops_per_step)
        # Always truncate metrics.jsonl to the current step: lines past it came from a crashed run
        # whose work is being redone.
        self.loggers = build_loggers(
            self.run_dir,
            tensorboard=cfg.tensorboard,
            wandb=cfg.wandb,
            wandb_project=cfg.wandb_project,
            config={"train": cfg.to_dict(), **self.run_info},
            resume_step=self.step,
            enabled=self.is_main,
            redo_eval=redo_eval,
        )
        pbar = tqdm(total=cfg.steps, initial=self.step, desc="train", disable=not (cfg.progress and self.is_main),
                    dynamic_ncols=True)
        t_start = time.perf_counter()
        tokens_at_start = self.tokens_seen
        self._window.reset(self.tokens_seen)
        self.model.train()
        try:
            if self._eval_pending and self.step < cfg.steps:
                self.evaluate()  # the periodic evaluation a signal cut short
            while self.step < cfg.steps:
                self._train_step()
                pbar.update(1)
                s, last = self.step, self.step == cfg.steps
                if last or (cfg.log_every and s % cfg.log_every == 0):
                    self._log(pbar)
                if self.eval_fn is not None and not last and (cfg.eval_every and s % cfg.eval_every == 0):
                    self.evaluate()
                if last or (cfg.checkpoint_every and s % cfg.checkpoint_every == 0):
                    self.save(eval_pending=last and self.eval_fn is not None)
            # the final evaluation comes after the last checkpoint and weights: a failure loses no training
            if self.on_trained is not None:
                self.on_trained(self)
            if self.eval_fn is not None:
                self.evaluate()
            fault_point("final")
        except KeyboardInterrupt as exc:
            message = save_on_interrupt(self, getattr(exc, "signum", signal.SIGINT))
            raise TrainingInterrupted(getattr(exc, "signum", signal.SIGINT), message) from None
        finally:
            pbar.close()
            self.loggers.close()
            self.loggers = Loggers([])  # a later evaluate() outside fit() must not write to closed files
        wall = time.perf_counter() - t_start
        new_tokens = self.tokens_seen - tokens_at_start
        summary = {
            "step": self.step,
            "finished": True,
            "resumed_from": resumed_from,
            "metrics": dict(self.last_metrics or (last_train_row(self.run_dir, self.step) if self.is_main else {})),
            "eval": dict(self.last_eval),
            "best": {k: dict(v) for k, v in self.best.items()},
            "wall_time": wall,
            "tokens_seen": self.tokens_seen,
            "tokens_per_s": new_tokens / wall if wall > 0 and new_tokens else None,
            "run_dir": str(self.run_dir),
        }
        if self.is_main:
            replace_json(self.run_dir / SUMMARY_FILE, summary)  # marks the run finished
        barrier()
        return summary

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Run eval_fn (main process) on the EMA weights if any; logs and tracks best values."""
        if self.eval_fn is None:
            return {}
        t0 = time.perf_counter()
        results: Dict[str, float] = {}
        target = self.ema.module if self.ema is not None else self.model
        if self.fsdp is not None:
            target = self.fsdp.eval_module(target)  # collective: rank 0's plain copy with the full weights
        if self.is_main:
            was_training = target.training
            target.eval()
            self._signals.raise_pending()
            self._signals.interruptible = True
            try:
                with forked_rng(), self._autocast():
                    raw = self.eval_fn(target)
            finally:
                self._signals.interruptible = False
                target.train(was_training)
            fault_point("eval")
            results = {k: float(v) for k, v in dict(raw or {}).items()}
            if self.flops_per_step is not None:  # cumulative training FLOPs at this evaluation (C(τ))
                results["flops"] = float(self.flops_per_step * self.step)
            update_best(self.best, results, self.step)
            self.loggers.log(self.step, results, event="eval")
            self._evaluated_step = self.step
            self.last_eval = results
            if not self.cfg.progress:
                print(eval_line(self.step, results), flush=True)
        barrier()
        self._window.excluded += time.perf_counter() - t0
        return results

    def save(self, eval_pending: bool = False) -> Path:
        """Checkpoint the current step (collective); ``eval_pending``: a resume evaluates it first."""
        t0 = time.perf_counter()
        self._sync_tokens()
        rng_states = gather_rng_states(self.world_size)
        if self.is_main or self.fsdp is not None:  # a sharded checkpoint is written by every rank
            self._saving = True
            try:
                self._write_checkpoint(rng_states, self.tokens_seen, eval_pending)
            finally:
                self._saving = False
        self._saved_step = self.step
        barrier()  # nobody moves on (or reads the checkpoint) before it is complete
        self._window.excluded += time.perf_counter() - t0
        return self.checkpoint_dir

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        return precision_autocast(self.device, self.precision["chosen"])

    def _train_step(self) -> None:
        cfg = self.cfg
        step = self.step
        lr = cfg.lr * lr_multiplier(step, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        ddp = isinstance(self.train_step, DDP)
        outs = []
        self._signals.raise_pending()
        self._signals.interruptible = True  # a signal here abandons this step: the checkpoint holds the last one
        for micro in range(cfg.grad_accum):
            fault_point("micro")
            # Gradients are all-reduced only on the last micro-step; earlier ones just accumulate.
            sync = micro == cfg.grad_accum - 1
            with self.train_step.no_sync() if (ddp and not sync) else contextlib.nullcontext():
                with self._autocast():
                    out = self.train_step(step, micro, self.rank, self.world_size)
                loss, metrics = self._unpack(out)
                # mean over micro-steps, so the gradient does not scale with grad_accum
                (loss / cfg.grad_accum).backward()
            outs.append((loss, metrics))

        self._signals.interruptible = False
        self._in_update = True
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self._params, cfg.grad_clip)
        else:
            grads = [p.grad for p in self._params if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        if self.fsdp is not None:
            grad_norm = self.fsdp.plain(grad_norm)  # a DTensor over the shards
        if not self.nonfinite.check(step, [loss for loss, _ in outs], grad_norm):  # NaN/inf, skipped (:mod:`.nonfinite`)
            self.step, self._in_update, self._rng_after_step = step + 1, False, capture_rng_state()
            return
        step_tokens = sum(self._window.add_micro(loss, metrics) for loss, metrics in outs)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step = step + 1
        # counted only once the step is complete, so an interrupt mid-step does not over-count
        self._pending_tokens += step_tokens
        self._in_update = False
        # The RNG state at a step boundary, for a checkpoint taken on Ctrl-C mid-step.
        self._rng_after_step = capture_rng_state()
        self._window.add_step(grad_norm, lr)
        fault_point("step")

    _unpack = staticmethod(unpack_loss)

    # ------------------------------------------------------------------ logging
    def _sync_tokens(self) -> None:
        """Sum every rank's pending token count into tokens_seen (collective)."""
        pending = torch.tensor(self._pending_tokens, dtype=torch.float64, device=self.device)
        self.tokens_seen += int(all_reduce_sum(pending).item())
        self._pending_tokens = 0

    def _log(self, pbar) -> None:
        if self._window.steps == 0:
            return
        self._sync_tokens()
        metrics = {**self._window.summary(self.tokens_seen, self.step, self.flops_per_step), **self.nonfinite.metrics()}
        self.last_metrics = metrics
        if self.is_main:
            self.loggers.log(self.step, metrics, event="train")
            pbar.set_postfix(progress_postfix(metrics), refresh=False)
            if not self.cfg.progress:
                print(train_line(self.step, self.cfg.steps, metrics), flush=True)
        self._window.reset(self.tokens_seen)  # pending is 0 here: _sync_tokens just summed it

    # ------------------------------------------------------------------ checkpoints
    def _write_checkpoint(self, rng_states, tokens_seen: int, eval_pending: bool = False) -> None:
        fields = dict(step=self.step, tokens_seen=tokens_seen, best=self.best, config=self.cfg, rng_states=rng_states,
                      flops=None if self.flops_per_step is None else self.flops_per_step * self.step,
                      extra={"run_info": self.run_info, "eval_pending": bool(eval_pending),
                             "nonfinite": self.nonfinite.state()})
        if self.fsdp is not None:  # collective; the sum of every rank's shard norms is finite iff all are
            self.nonfinite.check_params([self.fsdp.params_norm_sum()], self.step)
            self.fsdp.save(self.checkpoint_dir, self.optimizer, self.rank, **fields)
            return
        self.nonfinite.check_params(self.model.parameters(), self.step)  # never save NaN/inf parameters
        save_checkpoint(self.checkpoint_dir, self.model, self.optimizer, self.ema, **fields)

    def consolidated_state_dict(self) -> Dict[str, torch.Tensor]:
        """The weights ``model.safetensors`` holds (the EMA's when EMA is on), in full; under FSDP a
        collective whose result only rank 0 gets ({} elsewhere)."""
        module = self.ema.module if self.ema is not None else self.model
        return module.state_dict() if self.fsdp is None else self.fsdp.full_state_dict(module)

    def _resume_or_seed(self) -> Optional[int]:
        """Load run_dir/checkpoint if there is one (returns its step); else seed the global RNGs."""
        if self.is_main:
            find_checkpoint(self.run_dir)  # may repair an interrupted checkpoint swap
        barrier()
        ckpt = self.checkpoint_dir
        if not (ckpt / STATE_FILE).exists():
            # Seed here, not at import: the global RNG drives dropout/masking. The rank offset gives
            # each process its own stream.
            seed_all(self.cfg.seed + self.rank)
            self.step = 0
            return None

        if self.fsdp is not None:
            state = self.fsdp.load(ckpt, self.optimizer, self.rank)
        else:
            state = load_checkpoint(ckpt, self.model, self.optimizer, self.ema, rank=self.rank)
        self.step = int(state["step"])
        self._saved_step = self.step
        self._eval_pending = bool((state.get("extra") or {}).get("eval_pending"))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.best = dict(state.get("best") or {})
        self.nonfinite.load((state.get("extra") or {}).get("nonfinite") or {})
        reconcile_resumed(state, self.cfg, self.world_size, self.optimizer, ckpt)
        return self.step


__all__ = ["Trainer", "LossFn", "EvalFn", "TrainingInterrupted"]
