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

Nothing lost: the last step is checkpointed (and ``on_trained`` called: ``experiment.train``
writes the weights there) *before* the final evaluation; ``summary.json`` is written only after
it, with ``"finished": true``. A resume of an unfinished run redoes just that evaluation; a
finished run is left untouched. SIGINT/SIGTERM raise :class:`TrainingInterrupted` at a safe
point (never inside an update or a checkpoint write), after checkpointing the current step; an
evaluation it cut short is marked pending in the checkpoint and redone on resume. ``fit()`` holds
the run directory's lock (``lock.py``; rank 0 only under torchrun).
"""
from __future__ import annotations

import contextlib
import json
import signal
import threading
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
from .faults import fault_point
from .files import replace_json
from .lock import RunLock, RunLockedError
from .loggers import METRICS_FILE, Loggers, build_loggers, require_backends
from .metrics import LogWindow, eval_line, progress_postfix, train_line, update_best
from .provenance import write_run_json
from .rng import capture_rng_state, forked_rng, gather_rng_states, seed_all
from .schedule import lr_multiplier

LossFn = Callable[[nn.Module, int, int, int, int], Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, Any]]]]
EvalFn = Callable[[nn.Module], Mapping[str, float]]
SUMMARY_FILE = "summary.json"


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped ``fit()`` after the current step was checkpointed; ``exit_code`` is
    the shell's convention (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or signal.Signals(signum).name)
        self.signum = int(signum)
        self.exit_code = 128 + int(signum)


def finished_summary(run_dir: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """``run_dir/summary.json`` if it records a finished run (final evaluation done), else None."""
    try:
        summary = json.loads((Path(run_dir) / SUMMARY_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    if not isinstance(summary, dict):
        return None
    # older summaries have no "finished": an empty "eval" there was a final evaluation cut short
    return summary if summary.get("finished", bool(summary.get("eval"))) else None


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
        self._saved_step: Optional[int] = None  # step of the checkpoint on disk, as far as known
        self._evaluated_step: Optional[int] = None
        self._eval_pending = False  # the resumed checkpoint's evaluation was cut short: redo it
        self._interruptible = False  # a signal may raise now (else it waits for the next safe point)
        self._pending_signal: Optional[int] = None

    # ------------------------------------------------------------------ public
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR

    def fit(self) -> Dict[str, Any]:
        """Train to ``cfg.steps`` (resuming from ``run_dir/checkpoint``), evaluate, write summary.json."""
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = self._lock_run_dir()
        try:
            with self._signal_handlers():
                return self._fit()
        finally:
            if lock is not None:
                lock.release()

    def _fit(self) -> Dict[str, Any]:
        cfg = self.cfg
        barrier()
        resumed_from = self._resume_or_seed()
        self._rng_after_step = capture_rng_state()
        done = finished_summary(self.run_dir)
        if done is not None and done.get("step") == self.step:  # the final evaluation at this step ran
            self.best, self._eval_pending = dict(done.get("best") or self.best), False
            if self.step >= cfg.steps:
                if self.is_main:
                    print(f"{self.run_dir} is finished (step {self.step}, {SUMMARY_FILE}); nothing to do", flush=True)
                return done
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
            # The final evaluation runs after the last checkpoint and the weights: whatever fails
            # in it loses no training, and a resume redoes only the evaluation.
            if self.on_trained is not None:
                self.on_trained(self)
            if self.eval_fn is not None:
                self.evaluate()
            fault_point("final")
        except KeyboardInterrupt as exc:
            message = self._save_on_interrupt(getattr(exc, "signum", signal.SIGINT))
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
            "metrics": dict(self.last_metrics or self._last_train_row()),
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
        if self.is_main:
            target = self.ema.module if self.ema is not None else self.model
            was_training = target.training
            target.eval()
            self._raise_pending_signal()
            self._interruptible = True
            try:
                with forked_rng(), self._autocast():
                    raw = self.eval_fn(target)
            finally:
                self._interruptible = False
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
        """Checkpoint the current step (collective: every rank must call it). ``eval_pending``: this
        step's evaluation has not run yet (a resume runs it)."""
        t0 = time.perf_counter()
        self._sync_tokens()
        rng_states = gather_rng_states(self.world_size)
        if self.is_main:
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
        step_tokens = 0
        self._raise_pending_signal()
        self._interruptible = True  # a signal here abandons this step: the checkpoint holds the last one
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
            step_tokens += self._window.add_micro(loss, metrics)

        self._interruptible = False
        self._in_update = True
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self._params, cfg.grad_clip)
        else:
            grads = [p.grad for p in self._params if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
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
        metrics = self._window.summary(self.tokens_seen, self.step, self.flops_per_step)
        self.last_metrics = metrics
        if self.is_main:
            self.loggers.log(self.step, metrics, event="train")
            pbar.set_postfix(progress_postfix(metrics), refresh=False)
            if not self.cfg.progress:
                print(train_line(self.step, self.cfg.steps, metrics), flush=True)
        self._window.reset(self.tokens_seen)  # pending is 0 here: _sync_tokens just summed it

    # ------------------------------------------------------------------ checkpoints
    def _write_checkpoint(self, rng_states, tokens_seen: int, eval_pending: bool = False) -> None:
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
            extra={"run_info": self.run_info, "eval_pending": bool(eval_pending)},
        )

    def _save_on_interrupt(self, signum: int) -> str:
        """Ctrl-C / SIGTERM: keep the work done so far; returns the one-line message. No
        collectives here -- other ranks may be gone."""
        what = f"{signal.Signals(signum).name} at step {self.step}"
        if not self.is_main:
            return f"{what} (rank {self.rank})"
        if self._in_update or self._saving:
            return (f"{what}, while updating parameters or writing a checkpoint: not saved (the previous "
                    f"checkpoint in {self.checkpoint_dir}, if any, is intact)")
        if self.step == 0:
            return f"{what}: nothing trained yet, nothing saved"
        if self._saved_step != self.step:
            # Only this rank's pending tokens are known; assume the other ranks processed as many.
            tokens = self.tokens_seen + self._pending_tokens * self.world_size
            due = self.step == self.cfg.steps or bool(self.cfg.eval_every and self.step % self.cfg.eval_every == 0)
            pending = self.eval_fn is not None and due and self._evaluated_step != self.step
            self._saving = True
            self._write_checkpoint([self._rng_after_step or capture_rng_state()], tokens, pending)
            self._saving = False
            self._saved_step = self.step
        return f"{what}: checkpoint saved in {self.checkpoint_dir}; run the same command again to resume"

    def _raise_pending_signal(self) -> None:
        if self._pending_signal is not None:
            signum, self._pending_signal = self._pending_signal, None
            raise TrainingInterrupted(signum)

    def _on_signal(self, signum, frame) -> None:
        if self._interruptible:
            self._interruptible = False
            raise TrainingInterrupted(signum)
        self._pending_signal = signum  # raised at the next safe point (not inside an update or a save)

    @contextlib.contextmanager
    def _signal_handlers(self):
        """SIGINT and SIGTERM go through :meth:`_on_signal` during ``fit()`` -- only in the main
        thread and only where they have their default handlers (an ignored SIGINT stays ignored)."""
        installed = {}
        if threading.current_thread() is threading.main_thread():
            for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
                if signal.getsignal(sig) is default:
                    installed[sig] = signal.signal(sig, self._on_signal)
        try:
            yield
        finally:
            for sig, old in installed.items():
                signal.signal(sig, old)

    def _lock_run_dir(self) -> Optional[RunLock]:
        """Rank 0 takes the run directory's lock; every rank learns whether it got it (no rank waits
        at a barrier for a rank 0 that gave up)."""
        lock, error = None, None
        if self.is_main:
            try:
                lock = RunLock(self.run_dir).acquire()
            except RunLockedError as e:
                error = e
        if self.world_size > 1:
            failed = all_reduce_sum(torch.tensor(float(error is not None), device=self.device)).item()
            if failed and error is None:
                if lock is not None:
                    lock.release()
                raise RunLockedError(f"{self.run_dir} is in use by another writer (rank 0 could not lock it)")
        if error is not None:
            raise error
        return lock

    def _last_train_row(self) -> Dict[str, Any]:
        """The last train row of metrics.jsonl at or before this step (a resume that only redoes
        the final evaluation has logged none of its own)."""
        path = self.run_dir / METRICS_FILE
        row: Dict[str, Any] = {}
        if self.is_main and path.exists():
            for line in path.read_text().splitlines():
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if r.get("event") == "train" and r.get("step", 0) <= self.step:
                    row = {k: v for k, v in r.items() if k not in ("step", "time", "elapsed", "event")}
        return row

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
        self._saved_step = self.step
        self._eval_pending = bool((state.get("extra") or {}).get("eval_pending"))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.best = dict(state.get("best") or {})
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


__all__ = ["Trainer", "LossFn", "EvalFn", "TrainingInterrupted", "finished_summary", "SUMMARY_FILE"]
