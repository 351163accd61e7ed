"""What the Trainer reports: the metrics of a log window, the printed lines, best eval values."""
from __future__ import annotations

import math
import time
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from .distributed import all_reduce_mean

# Eval metrics whose name contains one of these are "higher is better"; everything else (loss,
# perplexity, NLL, error rates, ...) is "lower is better" when tracking the best value.
_HIGHER_IS_BETTER = ("acc", "f1", "score", "match", "reward", "bleu", "rouge", "precision", "recall")


def higher_is_better(name: str) -> bool:
    n = name.lower()
    return any(h in n for h in _HIGHER_IS_BETTER)


def update_best(best: Dict[str, Dict[str, float]], results: Mapping[str, float], step: int) -> None:
    """Record in ``best`` each finite result that beats the best value so far (with its step)."""
    for k, v in results.items():
        prev = best.get(k)
        better = prev is None or (v > prev["value"] if higher_is_better(k) else v < prev["value"])
        if better and math.isfinite(v):
            best[k] = {"value": v, "step": step}


class LogWindow:
    """Sums over the optimizer steps since the last log line.

    They stay on the device between log steps: no host sync (no ``.item()``) inside the loop.
    ``excluded`` is the eval/checkpoint time inside the window, which is not training time.
    """

    def __init__(self, device: torch.device, tokens_seen: int = 0):
        self.device = device
        self.reset(tokens_seen)

    def reset(self, tokens_seen: int) -> None:
        self.loss: Any = torch.zeros((), device=self.device)
        self.grad: Any = torch.zeros((), device=self.device)
        self.micro = 0
        self.steps = 0
        self.lr = 0.0
        self.sums: Dict[str, Any] = {}
        self.counts: Dict[str, int] = {}
        self.tokens0 = tokens_seen
        self.t0 = time.perf_counter()
        self.excluded = 0.0

    def add_micro(self, loss: torch.Tensor, metrics: Mapping[str, Any]) -> int:
        """Add one micro-step's loss and numeric metrics; returns its token count (``metrics["tokens"]``)."""
        self.loss = self.loss + loss.detach().float()
        self.micro += 1
        tokens = 0
        for k, v in metrics.items():
            if k == "tokens":
                tokens = int(v)
                continue
            if torch.is_tensor(v):
                if v.numel() != 1:
                    continue
                v = v.detach().float().reshape(())
            elif not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        return tokens

    def add_step(self, grad_norm: torch.Tensor, lr: float) -> None:
        self.steps += 1
        self.grad = self.grad + grad_norm.detach().float()
        self.lr = lr

    def summary(self, tokens_seen: int, step: int, flops_per_step: Optional[float]) -> Dict[str, Any]:
        """Means over the window (the loss also over ranks: collective), step time and throughput."""
        loss = all_reduce_mean(self.loss / self.micro).item()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = max(time.perf_counter() - self.t0 - self.excluded, 1e-9)
        tokens = tokens_seen - self.tokens0
        metrics: Dict[str, Any] = {
            k: (v.item() if torch.is_tensor(v) else v) / self.counts[k] for k, v in self.sums.items()
        }
        metrics.update(
            loss=loss,
            lr=self.lr,
            grad_norm=(self.grad / self.steps).item(),
            step_time=dt / self.steps,
            tokens_seen=tokens_seen,
        )
        if tokens > 0:
            metrics["tokens_per_s"] = tokens / dt
        if flops_per_step is not None:
            metrics["flops"] = flops_per_step * step
        return metrics


def progress_postfix(metrics: Mapping[str, Any]) -> Dict[str, str]:
    post = {"loss": f"{metrics['loss']:.4g}"}
    if "tokens_per_s" in metrics:
        post["tok/s"] = f"{metrics['tokens_per_s']:.3g}"
    return post


def train_line(step: int, steps: int, metrics: Mapping[str, Any]) -> str:
    """The line printed per log step when the progress bar is off."""
    extra = f" tok/s {metrics['tokens_per_s']:.3g}" if "tokens_per_s" in metrics else ""
    return (
        f"step {step}/{steps} loss {metrics['loss']:.4g} lr {metrics['lr']:.3g} "
        f"grad_norm {metrics['grad_norm']:.3g} step_time {metrics['step_time'] * 1e3:.1f}ms{extra}"
    )


def eval_line(step: int, results: Mapping[str, float]) -> str:
    return f"eval step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in results.items())


def unpack_loss(out: Any) -> Tuple[torch.Tensor, Mapping[str, Any]]:
    """``loss_fn``'s result as (scalar loss, metrics); a TypeError for anything else."""
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


__all__ = ["unpack_loss", "LogWindow", "eval_line", "higher_is_better", "progress_postfix", "train_line", "update_best"]
