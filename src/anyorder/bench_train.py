"""``anyorder bench train``: anyorder's training step against a plain PyTorch reference step.

The reference is written here, in the plainest PyTorch: a pre-norm transformer of the same
size and parts as anyorder's backbone (RMSNorm, RoPE, SDPA attention, SwiGLU MLP, untied output
head), trained on MDLM's random-masking loss (Sahoo et al., 2024, arXiv 2406.07524): draw
t ~ U(0, 1) per row, mask each position with probability t, compute the logits of every
position, take the cross-entropy on the masked ones weighted 1/t, and step torch's default
AdamW. That is what a user would write first; anyorder's step (its order's training plan, its
loss and the trainer's optimizer) should not cost more.

Step times are measured in one process, round-robin (reference, then each anyorder order, again
and again) and the best of the rounds is kept, so a busy neighbour on a shared machine slows
every runner alike and the ratios stay meaningful; with one torch thread (``--threads 1``) the
clock is that thread's CPU time, which leaves out the time a neighbour holds the core. Peak memory is measured in a fresh
subprocess per runner: the growth of the process's peak resident set (``VmHWM``) over its
resident set once model and optimizer exist, i.e. what the steps themselves allocate
(activations, logits, gradients, AdamW's moments). A process's peak can only grow, hence one
process per runner.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import ModelConfig, Transformer
from .objectives.nelbo import plan_loss
from .orders import build_order
from .train.optim import build_adamw
from .train.precision import autocast


# ---------------------------------------------------------------- the plain reference
class PlainBlock(nn.Module):
    def __init__(self, d: int, n_heads: int, hidden: int):
        super().__init__()
        self.n_heads = n_heads
        self.norm1, self.norm2 = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.gate, self.up = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x, cos, sin):
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def rotate(x, cos, sin):
    """RoPE (Su et al., 2021, arXiv 2104.09864) on the two halves of each head."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class PlainTransformer(nn.Module):
    def __init__(self, vocab: int, d: int, n_layers: int, n_heads: int, max_len: int):
        super().__init__()
        hidden = int(2 * 4 * d / 3)  # SwiGLU with the parameters of a 4x MLP, like anyorder's
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(PlainBlock(d, n_heads, hidden) for _ in range(n_layers))
        self.norm, self.head = nn.RMSNorm(d, eps=1e-6), nn.Linear(d, vocab, bias=False)
        hd = d // n_heads
        ang = torch.arange(max_len).float().unsqueeze(-1) / 10000.0 ** (torch.arange(0, hd, 2).float() / hd)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, tokens):
        L = tokens.shape[1]
        x = self.emb(tokens)
        for blk in self.blocks:
            x = blk(x, self.cos[:L], self.sin[:L])
        return self.head(self.norm(x))


def reference_loss(model, x0, mask_id: int, gen):
    """MDLM's loss, plainly: full logits, cross-entropy on the masked positions, weight 1/t."""
    B, L = x0.shape
    t = torch.rand(B, 1, generator=gen).clamp_min(1e-3)
    masked = torch.rand(B, L, generator=gen) < t
    logits = model(torch.where(masked, torch.full_like(x0, mask_id), x0))
    ce = F.cross_entropy(logits[masked].float(), x0[masked], reduction="none")
    return (ce / t.expand(B, L)[masked]).sum() / x0.numel()


# ---------------------------------------------------------------- runners
def _make_runner(kind: str, cfg: Dict[str, int], precision: str):
    """A closure doing one training step of ``kind`` ("reference" or an order spec as JSON)."""
    torch.manual_seed(0)
    V, L, B = cfg["vocab"], cfg["seq_len"], cfg["batch_size"]
    mask_id = V
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, V, (B, L), generator=gen)
    device = torch.device("cpu")
    if kind == "reference":
        model = PlainTransformer(V + 1, cfg["d_model"], cfg["n_layers"], cfg["n_heads"], L)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def loss_fn():
            return reference_loss(model, x0, mask_id, gen)
    else:
        order = build_order(json.loads(kind))
        model = Transformer(ModelConfig(vocab_size=V + 1, mask_id=mask_id, d_model=cfg["d_model"],
                                        n_layers=cfg["n_layers"], n_heads=cfg["n_heads"], max_len=L))
        opt = build_adamw(list(model.parameters()), 1e-4, (0.9, 0.999), device)
        layout = order.layout(torch.ones_like(x0, dtype=torch.bool))

        def loss_fn():
            return plan_loss(model, order.train_plan(x0, layout, mask_id, gen))[0]

    def step():
        with autocast(device, precision):
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return model, step


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` size (``VmRSS``: resident now; ``VmHWM``: the peak) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no {field} in /proc/self/status")


def _memory_child(kind: str, cfg: Dict[str, int], precision: str, steps: int = 2) -> Dict[str, float]:
    """Run in a fresh process: peak RSS growth (MB) over the steps, after model and optimizer exist.

    The peak is the address space's high-water mark (``VmHWM``), reset to the current RSS before
    the steps where the kernel allows it. (Not ``getrusage``'s ``ru_maxrss``: Linux carries it over
    from the parent process across fork and exec, so a child's starts at the parent's size.)
    """
    _, step = _make_runner(kind, cfg, precision)
    base = _status_bytes("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass  # then the peak may include the set-up, the same for every runner
    for _ in range(steps):
        step()
    return {"base_mb": round(base / 2**20, 1), "peak_growth_mb": round((_status_bytes("VmHWM") - base) / 2**20, 1)}


def peak_memory(kind: str, cfg: Dict[str, int], precision: str) -> Dict[str, float]:
    code = ("import json, sys; from anyorder.bench_train import _memory_child; "
            "print(json.dumps(_memory_child(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3])))")
    out = subprocess.run([sys.executable, "-c", code, kind, json.dumps(cfg), precision], check=True,
                         capture_output=True, text=True, env=_child_env())
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    return env


def step_clock():
    """(clock, what it measures). With one torch thread every step runs on the calling thread, so
    its CPU time is the step's cost without the time a busy neighbour holds the core (on a shared
    machine wall time mostly measures the neighbour); with more threads, wall time (CPU time
    would count idle OpenMP threads spinning)."""
    if torch.get_num_threads() == 1:
        return time.thread_time, "CPU time of the one compute thread"
    return time.perf_counter, "wall time"


def time_steps(kinds: Sequence[str], cfg: Dict[str, int], precision: str, rounds: int) -> Dict[str, float]:
    """Best seconds per step of each runner, round-robin over ``rounds`` rounds (after a warm-up)."""
    runners = {k: _make_runner(k, cfg, precision)[1] for k in kinds}
    for step in runners.values():
        step()  # warm-up: allocator, kernel selection, AdamW state
    clock = step_clock()[0]
    best = {k: math.inf for k in kinds}
    for _ in range(rounds):
        for k, step in runners.items():
            t0 = clock()
            step()
            best[k] = min(best[k], clock() - t0)
    return best


ORDERS = ({"name": "random"}, {"name": "block", "block_size": 16})


def bench_train_vs_reference(d_model: int = 256, n_layers: int = 6, vocab: int = 8192, seq_len: int = 128,
                             batch_sizes: Dict[str, int] = None, rounds: Dict[str, int] = None,
                             precisions: Sequence[str] = ("fp32", "bf16"), memory: bool = True) -> Dict[str, object]:
    """Step-time ratios anyorder / plain reference and peak-memory growth, per precision."""
    batch_sizes = batch_sizes or {"fp32": 16, "bf16": 4}  # 64 is the size; 16 fits a shared 2-core machine
    rounds = rounds or {"fp32": 8, "bf16": 20}
    kinds = ["reference"] + [json.dumps(o) for o in ORDERS]
    out: List[Dict[str, object]] = []
    for precision in precisions:
        cfg = {"d_model": d_model, "n_layers": n_layers, "n_heads": max(1, d_model // 64), "vocab": vocab,
               "seq_len": seq_len, "batch_size": batch_sizes[precision]}
        best = time_steps(kinds, cfg, precision, rounds[precision])
        mem = {k: peak_memory(k, cfg, precision) for k in kinds} if memory else {}
        for k in kinds:
            row = {"runner": "plain reference" if k == "reference" else f"anyorder {json.loads(k)['name']}",
                   "precision": precision, "batch_size": cfg["batch_size"], "step_seconds": round(best[k], 4),
                   "ratio_to_reference": round(best[k] / best["reference"], 3)}
            if mem:
                row.update({"peak_growth_mb": mem[k]["peak_growth_mb"],
                            "memory_ratio_to_reference": round(mem[k]["peak_growth_mb"]
                                                               / max(mem["reference"]["peak_growth_mb"], 1e-9), 3)})
            out.append(row)
    return {"model": {"d_model": d_model, "n_layers": n_layers, "vocab": vocab, "seq_len": seq_len},
            "batch_size": batch_sizes, "rounds": rounds, "threads": torch.get_num_threads(),
            "timing": f"best of the rounds, runners interleaved round-robin in one process; {step_clock()[1]}",
            "memory": "peak RSS growth over model + optimizer, one fresh process per runner",
            "results": out}


def busy_ratio(rounds: int = 3, steps: int = 5) -> Dict[str, object]:
    """The demo's training step with and without a competing busy process, alternating.

    Each round times ``steps`` steps quiet, then starts a busy-loop Python process, times
    ``steps`` steps and stops it; the ratio is median busy / median quiet step time. Run it as
    ``python -m anyorder.bench_train busy`` (under ``anyorder`` the wait policy is PASSIVE; set
    ``OMP_WAIT_POLICY`` yourself to compare).
    """
    cfg = {"d_model": 128, "n_layers": 4, "n_heads": 4, "vocab": 12, "seq_len": 33, "batch_size": 64}
    step = _make_runner(json.dumps({"name": "random"}), cfg, "fp32")[1]
    step()
    times: Dict[str, List[float]] = {"quiet": [], "busy": []}
    for _ in range(rounds):
        for mode in ("quiet", "busy"):
            proc = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if mode == "busy" else None
            try:
                if proc is not None:
                    time.sleep(0.5)
                for _ in range(steps):
                    t0 = time.perf_counter()
                    step()
                    times[mode].append(time.perf_counter() - t0)
            finally:
                if proc is not None:
                    proc.kill()
                    proc.wait()
    quiet, busy = statistics.median(times["quiet"]), statistics.median(times["busy"])
    return {"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "threads": torch.get_num_threads(),
            "quiet_step_s": round(quiet, 4), "busy_step_s": round(busy, 4), "busy_over_quiet": round(busy / quiet, 2)}


__all__ = ["PlainTransformer", "bench_train_vs_reference", "busy_ratio", "reference_loss"]

if __name__ == "__main__":
    if sys.argv[1:] == ["busy"]:
        print(json.dumps(busy_ratio()))
