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
"""
from __future__ import annotations

import contextlib
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from .checkpoint import CHECKPOINT_DIR, STATE_FILE, find_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import all_reduce_sum, barrier, init_distributed, unwrap
from .ema import EMA
from .loggers import Loggers, build_loggers, require_backends
from .metrics import LogWindow, eval_line, progress_postfix, train_line, update_best
from .nonfinite import NonFiniteGuard
from .provenance import write_run_json
from .rng import capture_rng_state, forked_rng, gather_rng_states, seed_all
from .schedule import lr_multiplier

LossFn = Callable[[nn.Module, int, int, int, int], Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, Any]]]]
EvalFn = Callable[[nn.Module], Mapping[str, float]]


class LossStep(nn.Module):
    """One micro-step's loss as a module: ``forward(step, micro, rank, world)`` runs
    ``loss_fn(model, ...)``. DDP wraps this, not the model, so a loss that calls sub-modules or
    several passes (e.g. LoMDM's heads) still goes through the forward DDP instruments."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, step: int, micro: int, rank: int, world_size: int):
        return self.loss_fn(self.model, step, micro, rank, world_size)


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
    ):
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.loss_fn = loss_fn
        self.eval_fn = eval_fn
        self.run_dir = Path(run_dir)
        self.run_info = dict(run_info or {})
        self.flops_per_step = flops_per_step

        self.dist = init_distributed()
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.is_main = self.dist.is_main
        self.device = self.dist.device
        if self.is_main:
            require_backends(tensorboard=cfg.tensorboard, wandb=cfg.wandb)  # fail before any compute

        self.model = unwrap(model).to(self.device)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no parameters with requires_grad=True; nothing to train")
        # Decay only matrices/embeddings; biases, norm gains and scalars are not decayed (standard
        # practice: decaying them hurts and does not regularise anything useful).
        # ``lr_scale(name)`` gives some parameters their own learning rate (e.g. LoMDM's schedule
        # heads); groups are keyed by (decayed?, scale) in order of first appearance.
        buckets: Dict[Any, List[torch.nn.Parameter]] = {}
        for n, p in named:
            key = (p.dim() >= 2, float(lr_scale(n)) if lr_scale is not None else 1.0)
            buckets.setdefault(key, []).append(p)
        groups = [{"params": ps, "weight_decay": cfg.weight_decay if dec else 0.0, "decay": dec, "lr_scale": sc}
                  for (dec, sc), ps in buckets.items()]
        # fused AdamW is one kernel per step on CUDA; on CPU the default (foreach) is used
        self.optimizer = torch.optim.AdamW(
            groups, lr=cfg.lr, betas=cfg.betas, fused=True if self.device.type == "cuda" else None
        )
        self._params = [p for _, p in named]

        # The EMA copy is made before DDP wrapping so it is a plain module.
        self.ema = EMA(self.model, cfg.ema) if cfg.ema > 0 else None
        # Under DDP the loss runs inside LossStep.forward: DDP all-reduces the gradients of whatever
        # the loss touched. One process calls loss_fn on the model directly.
        self.train_step: nn.Module = LossStep(self.model, loss_fn)
        if self.world_size > 1:
            self.train_step = DDP(self.train_step, device_ids=[self.device.index] if self.device.type == "cuda" else None)

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
        self.nonfinite = NonFiniteGuard(cfg, self.optimizer, self.world_size, self.is_main, self.checkpoint_dir)

    # ------------------------------------------------------------------ public
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR

    def fit(self) -> Dict[str, Any]:
        cfg = self.cfg
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        resumed_from = self._resume_or_seed()
        self._rng_after_step = capture_rng_state()
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
        )
        pbar = tqdm(
            total=cfg.steps,
            initial=self.step,
            desc="train",
            disable=not (cfg.progress and self.is_main),
            dynamic_ncols=True,
        )
        t_start = time.perf_counter()
        tokens_at_start = self.tokens_seen
        self._window.reset(self.tokens_seen)
        self.model.train()
        try:
            while self.step < cfg.steps:
                self._train_step()
                pbar.update(1)
                s, last = self.step, self.step == cfg.steps
                if last or (cfg.log_every and s % cfg.log_every == 0):
                    self._log(pbar)
                if self.eval_fn is not None and (last or (cfg.eval_every and s % cfg.eval_every == 0)):
                    self.evaluate()
                if last or (cfg.checkpoint_every and s % cfg.checkpoint_every == 0):
                    self.save()
        except KeyboardInterrupt:
            self._save_on_interrupt()
            raise
        finally:
            pbar.close()
            self.loggers.close()
            self.loggers = Loggers([])  # a later evaluate() outside fit() must not write to closed files
        wall = time.perf_counter() - t_start
        new_tokens = self.tokens_seen - tokens_at_start
        return {
            "step": self.step,
            "resumed_from": resumed_from,
            "metrics": dict(self.last_metrics),
            "eval": dict(self.last_eval),
            "best": {k: dict(v) for k, v in self.best.items()},
            "wall_time": wall,
            "tokens_seen": self.tokens_seen,
            "tokens_per_s": new_tokens / wall if wall > 0 and new_tokens else None,
            "run_dir": str(self.run_dir),
        }

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Run eval_fn (main process) on the EMA weights if any; logs and tracks best values."""
        if self.eval_fn is None:
            return {}
        t0 = time.perf_counter()
        results: Dict[str, float] = {}
        if self.is_main:
            target = self.ema.module if self.ema is not None else self.model
            was_training = target.training
            target.eval()
            try:
                with forked_rng(), self._autocast():
                    raw = self.eval_fn(target)
            finally:
                target.train(was_training)
            results = {k: float(v) for k, v in dict(raw or {}).items()}
            if self.flops_per_step is not None:  # cumulative training FLOPs at this evaluation (C(τ))
                results["flops"] = float(self.flops_per_step * self.step)
            update_best(self.best, results, self.step)
            self.loggers.log(self.step, results, event="eval")
            self.last_eval = results
            if not self.cfg.progress:
                print(eval_line(self.step, results), flush=True)
        barrier()
        self._window.excluded += time.perf_counter() - t0
        return results

    def save(self) -> Path:
        """Checkpoint the current step (collective: every rank must call it)."""
        t0 = time.perf_counter()
        self._sync_tokens()
        rng_states = gather_rng_states(self.world_size)
        if self.is_main:
            self._saving = True
            try:
                self._write_checkpoint(rng_states, self.tokens_seen)
            finally:
                self._saving = False
        barrier()  # nobody moves on (or reads the checkpoint) before it is complete
        self._window.excluded += time.perf_counter() - t0
        return self.checkpoint_dir

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        return torch.autocast(
            device_type=self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16"
        )

    def _train_step(self) -> None:
        cfg = self.cfg
        step = self.step
        lr = cfg.lr * lr_multiplier(step, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        ddp = isinstance(self.train_step, DDP)
        outs = []
        for micro in range(cfg.grad_accum):
            # Gradients are all-reduced only on the last micro-step; earlier ones just accumulate.
            sync = micro == cfg.grad_accum - 1
            with self.train_step.no_sync() if (ddp and not sync) else contextlib.nullcontext():
                with self._autocast():
                    out = self.train_step(step, micro, self.rank, self.world_size)
                loss, metrics = self._unpack(out)
                # mean over micro-steps, so the gradient does not scale with grad_accum
                (loss / cfg.grad_accum).backward()
            outs.append((loss, metrics))

        self._in_update = True
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self._params, cfg.grad_clip)
        else:
            grads = [p.grad for p in self._params if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
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

    def _unpack(self, out: Any) -> Tuple[torch.Tensor, Mapping[str, Any]]:
        if isinstance(out, tuple) and len(out) == 2:
            loss, metrics = out
        else:
            loss, metrics = out, {}
        if not torch.is_tensor(loss) or loss.numel() != 1:
            raise TypeError(
                "loss_fn must return (loss, metrics) with loss a scalar tensor; got "
                f"{type(loss).__name__}{'' if not torch.is_tensor(loss) else ' of shape ' + str(list(loss.shape))}"
            )
        return loss.reshape(()), metrics or {}

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
    def _write_checkpoint(self, rng_states, tokens_seen: int) -> None:
        self.nonfinite.check_params(self.model.parameters(), self.step)  # never save NaN/inf parameters
        save_checkpoint(
            self.checkpoint_dir,
            self.model,
            self.optimizer,
            self.ema,
            step=self.step,
            tokens_seen=tokens_seen,
            flops=None if self.flops_per_step is None else self.flops_per_step * self.step,
            best=self.best,
            config=self.cfg,
            rng_states=rng_states,
            extra={"run_info": self.run_info, "nonfinite": self.nonfinite.state()},
        )

    def _save_on_interrupt(self) -> None:
        """Ctrl-C: keep the work done so far. No collectives here -- other ranks may be gone."""
        if not self.is_main:
            return
        if self._in_update or self._saving:
            warnings.warn(
                "interrupted while updating parameters or writing a checkpoint; not saving "
                f"(the previous checkpoint in {self.checkpoint_dir}, if any, is intact)"
            )
            return
        if self.step == 0:
            return
        # Only this rank's pending tokens are known; assume the other ranks processed as many.
        tokens = self.tokens_seen + self._pending_tokens * self.world_size
        print(f"\ninterrupted: saving a checkpoint at step {self.step} to {self.checkpoint_dir}", file=sys.stderr)
        self._write_checkpoint([self._rng_after_step or capture_rng_state()], tokens)

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

        state = load_checkpoint(ckpt, self.model, self.optimizer, self.ema, rank=self.rank)
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.best = dict(state.get("best") or {})
        self.nonfinite.load((state.get("extra") or {}).get("nonfinite") or {})
        saved_cfg = state.get("config") or {}
        if state.get("config_hash") not in (None, self.cfg.hash()):
            now = self.cfg.dynamics_dict()
            changed = sorted(k for k in now if saved_cfg.get(k) != now[k])
            warnings.warn(
                f"resuming from {ckpt} with a different config ({', '.join(changed)}); training continues "
                "but will not match an uninterrupted run with either config"
            )
        if state.get("world_size") not in (None, self.world_size):
            warnings.warn(
                f"checkpoint was saved with world size {state['world_size']}, resuming with {self.world_size}: "
                "batches differ from the original run, so the result is not bit-exact"
            )
        # The config wins over hyper-parameters stored with the optimizer state (lr is set per step).
        for g in self.optimizer.param_groups:
            g["weight_decay"] = self.cfg.weight_decay if g.get("decay", True) else 0.0
            g["betas"] = self.cfg.betas
        if self.step > self.cfg.steps:
            warnings.warn(f"checkpoint is at step {self.step}, past cfg.steps={self.cfg.steps}; nothing to do")
        return self.step


__all__ = ["Trainer", "LossFn", "EvalFn"]
