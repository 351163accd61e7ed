"""What keeps a run safe around the training loop: signals, the run directory's lock, the summary.

* SIGINT/SIGTERM during ``Trainer.fit()`` go through a :class:`SignalGuard`: they raise
  :class:`TrainingInterrupted` at once where that loses nothing (inside a micro-step or an
  evaluation) and otherwise at the next safe point (never inside an update or a checkpoint write).
* ``summary.json`` is written after the final evaluation with ``"finished": true``
  (:func:`finished_summary` reads it): its absence means the final evaluation is still to run.
* :func:`lock_run_dir`: rank 0 takes ``run_dir/.lock`` and every rank learns the outcome.
"""
from __future__ import annotations

import contextlib
import json
import signal
import threading
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from .distributed import all_reduce_sum
from .lock import RunLock, RunLockedError
from .loggers import METRICS_FILE
from .rng import capture_rng_state

SUMMARY_FILE = "summary.json"


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped ``fit()`` after the current step was checkpointed; ``exit_code`` is
    the shell's convention (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or signal.Signals(signum).name)
        self.signum = int(signum)
        self.exit_code = 128 + int(signum)


class SignalGuard:
    """SIGINT/SIGTERM handling for one ``fit()``: ``interruptible`` says a signal may raise now."""

    def __init__(self):
        self.interruptible = False
        self.pending: Optional[int] = None

    def raise_pending(self) -> None:
        if self.pending is not None:
            signum, self.pending = self.pending, None
            raise TrainingInterrupted(signum)

    def _on_signal(self, signum, frame) -> None:
        if self.interruptible:
            self.interruptible = False
            raise TrainingInterrupted(signum)
        self.pending = signum  # raised at the next safe point

    @contextlib.contextmanager
    def installed(self):
        """Only in the main thread and only over default handlers (an ignored SIGINT stays ignored)."""
        old = {}
        if threading.current_thread() is threading.main_thread():
            for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
                if signal.getsignal(sig) is default:
                    old[sig] = signal.signal(sig, self._on_signal)
        try:
            yield self
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)


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


def finished_at_resume(trainer) -> Optional[Dict[str, Any]]:
    """After a resume: if summary.json records the final evaluation at the resumed step, its best
    values count (that evaluation ran and is not redone); returns the summary when nothing is left."""
    t, done = trainer, finished_summary(trainer.run_dir)
    if done is None or done.get("step") != t.step:
        return None
    t.best, t._eval_pending = dict(done.get("best") or t.best), False
    if t.step < t.cfg.steps:
        return None
    if t.is_main:
        print(f"{t.run_dir} is finished (step {t.step}, {SUMMARY_FILE}); nothing to do", flush=True)
    return done


def last_train_row(run_dir: Path, step: int) -> Dict[str, Any]:
    """The last train row of metrics.jsonl at or before ``step``, without step/time/event (for the
    summary of a resume that only redoes the final evaluation and logged no row of its own)."""
    path, row = Path(run_dir) / METRICS_FILE, {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("event") == "train" and r.get("step", 0) <= step:
                row = {k: v for k, v in r.items() if k not in ("step", "time", "elapsed", "event")}
    return row


@contextlib.contextmanager
def lock_run_dir(run_dir: Path, is_main: bool, world_size: int, device):
    """Rank 0 holds the run directory's lock for the ``with`` block; every rank learns whether it
    got it (no rank waits at a barrier for a rank 0 that gave up)."""
    lock, error = None, None
    if is_main:
        try:
            lock = RunLock(run_dir).acquire()
        except RunLockedError as e:
            error = e
    if world_size > 1 and all_reduce_sum(torch.tensor(float(error is not None), device=device)).item() and not is_main:
        raise RunLockedError(f"{run_dir} is in use by another writer (rank 0 could not lock it)")
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def save_on_interrupt(trainer, signum: int) -> str:
    """Ctrl-C / SIGTERM: checkpoint the trainer's current step unless that is on disk already (an
    evaluation it cut short is marked pending); returns the one-line message. No collectives:
    other ranks may be gone."""
    t = trainer
    what = f"{signal.Signals(signum).name} at step {t.step}"
    if not t.is_main:
        return f"{what} (rank {t.rank})"
    if getattr(t, "fsdp", None) is not None:  # every rank writes its shards: a collective, and ranks may be gone
        return f"{what}: not saved (a sharded checkpoint needs every rank); resuming starts from {t.checkpoint_dir}"
    if t._in_update or t._saving:
        return (f"{what}, while updating parameters or writing a checkpoint: not saved (the previous "
                f"checkpoint in {t.checkpoint_dir}, if any, is intact)")
    if t.step == 0:
        return f"{what}: nothing trained yet, nothing saved"
    if t._saved_step != t.step:
        # Only this rank's pending tokens are known; assume the other ranks processed as many.
        tokens = t.tokens_seen + t._pending_tokens * t.world_size
        due = t.step == t.cfg.steps or bool(t.cfg.eval_every and t.step % t.cfg.eval_every == 0)
        pending = t.eval_fn is not None and due and t._evaluated_step != t.step
        t._saving = True
        t._write_checkpoint([t._rng_after_step or capture_rng_state()], tokens, pending)
        t._saving = False
        t._saved_step = t.step
    return f"{what}: checkpoint saved in {t.checkpoint_dir}; run the same command again to resume"


__all__ = ["SUMMARY_FILE", "SignalGuard", "TrainingInterrupted", "finished_at_resume", "finished_summary", "last_train_row", "lock_run_dir",
           "save_on_interrupt"]
