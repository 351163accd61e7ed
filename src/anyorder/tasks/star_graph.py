"""Star-graph path-finding (Bachmann & Nagarajan, 2024, arXiv 2403.06963), one of the three tasks
of "On the Trainability of Masked Diffusion Language Models via Blockwise Locality" (2026).

A source node has ``degree`` arms of ``path_len`` nodes each (counting the source), over
``num_nodes`` labels; the goal is the last node of one arm. The prompt lists the directed edges
in random order, then the source and the goal; the answer is the path from source to goal.

Sequence (one token per symbol): ``u v | u v | ... | u v / s g =`` then the ``path_len`` path
tokens (reversed with ``reverse=True``). Vocabulary: nodes 0..N-1, ``|`` = N, ``/`` = N+1,
``=`` = N+2, [MASK] = N+3. Teacher-forced AR famously fails here ("Clever Hans": it learns
to copy the next edge from the previous path token and must guess the first step, ≈ 1/degree).
"""
from __future__ import annotations

from typing import Dict, Tuple

import sys

import numpy as np
import torch
from tqdm import tqdm

from ..analysis.teacher_forced import teacher_forced_accuracy
from ..checks import check_bool, check_int, check_memory

from .base import TASKS, Task


def star_graph(degree: int, path_len: int, num_nodes: int, rng: np.random.Generator):
    """(edges [E, 2], path [path_len]) with node labels drawn without replacement."""
    need = degree * (path_len - 1) + 1
    if num_nodes < need:
        raise ValueError(f"task.num_nodes={num_nodes} is too small for degree={degree} arms of path_len={path_len} "
                         f"nodes: a star needs degree*(path_len-1)+1 = {need} distinct nodes")
    nodes = rng.permutation(num_nodes)[:need]
    source, rest = int(nodes[0]), nodes[1:].reshape(degree, path_len - 1)
    arms = np.concatenate([np.full((degree, 1), source), rest], axis=1)   # [degree, path_len]
    edges = np.stack([arms[:, :-1], arms[:, 1:]], axis=-1).reshape(-1, 2)  # directed away from source
    edges = edges[rng.permutation(len(edges))]
    return edges, arms[0].copy()  # arm 0 leads to the goal (the arms are interchangeable)


@TASKS.register("star_graph")
class StarGraphTask(Task):
    name = "star_graph"
    threshold = ("path_acc", ">=", 0.9)
    secondary_metric = "token_acc"
    # accuracy at each path step, decoded and teacher-forced: the Clever-Hans signature
    detail_metrics = (r"path_acc", r"step\d+_acc", r"tf_step\d+_acc")
    detail_curves = (r"tf_step\d+_acc",)

    def __init__(self, num_nodes: int = 20, degree: int = 3, path_len: int = 5, n_train: int = 50000,
                 n_eval: int = 1000, reverse: bool = False, seed: int = 0):
        degree = check_int("task.degree", degree, 2, note=" (one arm is trivial)")
        path_len = check_int("task.path_len", path_len, 2, note=" (source and goal)")
        num_nodes = check_int("task.num_nodes", num_nodes, 1)  # enough for the star: star_graph() below
        n_train, n_eval = check_int("task.n_train", n_train, 1), check_int("task.n_eval", n_eval, 1)
        seed = check_int("task.seed", seed, 0)
        self.num_nodes, self.degree, self.path_len = num_nodes, degree, path_len
        self.reverse = check_bool("task.reverse", reverse)
        N = self.num_nodes
        self.bar, self.slash, self.eq, self.mask_id = N, N + 1, N + 2, N + 3
        self.vocab_size = N + 4
        self.n_edges = degree * (path_len - 1)
        self.prompt_len = 3 * self.n_edges + 3
        self.seq_len = self.prompt_len + path_len
        rng = np.random.default_rng(seed)
        total = n_train + n_eval
        check_memory(f"task.n_train + task.n_eval = {total:,} star graphs", 2 * 8 * total * self.seq_len,
                     "make task.n_train smaller")
        check_memory(f"task.num_nodes = {N:,} node labels", 8 * N, "make task.num_nodes smaller")
        star_graph(degree, path_len, num_nodes, rng)  # validate the settings before the loop
        rows = tqdm(range(total), desc="star graphs", unit="graph", delay=2, file=sys.stderr, leave=False)
        self.data = torch.from_numpy(np.stack([self.encode(*star_graph(degree, path_len, num_nodes, rng))
                                               for _ in rows]))
        self.eval_x, self.train_x = self.data[: int(n_eval)], self.data[int(n_eval):]
        self.answer_mask = torch.zeros(self.seq_len, dtype=torch.bool)
        self.answer_mask[self.prompt_len:] = True

    def encode(self, edges: np.ndarray, path: np.ndarray) -> np.ndarray:
        body = np.concatenate([edges, np.full((len(edges), 1), self.bar)], axis=1).reshape(-1)[:-1]
        target = path[::-1] if self.reverse else path
        return np.concatenate([body, [self.slash, path[0], path[-1], self.eq], target]).astype(np.int64)

    def decode_edges(self, row: torch.Tensor):
        body = row[: 3 * self.n_edges - 1].tolist() + [self.bar]
        return [(body[3 * i], body[3 * i + 1]) for i in range(self.n_edges)]

    def train_batch(self, batch_size, gen):
        idx = torch.randint(0, len(self.train_x), (batch_size,), generator=gen)
        x0 = self.train_x[idx]
        return x0, self.answer_mask.expand_as(x0).clone()

    def eval_set(self, n):
        x0 = self.eval_x[:n]
        return x0, self.answer_mask.expand_as(x0).clone()

    def is_valid_path(self, row: torch.Tensor, path) -> bool:
        """Does ``path`` (source first) follow the prompt's edges from its source to its goal?"""
        path = list(path)[::-1] if self.reverse else list(path)
        edges = set(self.decode_edges(row))
        s, g = int(row[3 * self.n_edges]), int(row[3 * self.n_edges + 1])
        return path[0] == s and path[-1] == g and all((a, b) in edges for a, b in zip(path[:-1], path[1:]))

    def path_order(self, values: torch.Tensor) -> torch.Tensor:
        """[..., path_len] answer-position values put in path order (source first)."""
        return values.flip(-1) if self.reverse else values

    def metrics(self, pred, x0, answer) -> Dict[str, float]:
        p, t = pred[:, self.prompt_len:], x0[:, self.prompt_len:]
        out = {"path_acc": float((p == t).all(-1).double().mean()), "token_acc": float((p == t).double().mean())}
        # decoded accuracy of each path node, source = step 0 (given in the prompt, as is the goal)
        step_ok = self.path_order((p == t).double()).mean(0)
        out.update({f"step{i}_acc": float(step_ok[i]) for i in range(1, self.path_len - 1)})
        return out

    def model_metrics(self, model, order, x0, answer) -> Dict[str, float]:
        """Teacher-forced accuracy of each path step (the true path before it given): the
        Clever-Hans signature of AR is ~1/degree on step 1 and ~1 on every later step."""
        if self.reverse:  # teacher forcing runs left to right, i.e. from the goal: not the path's order
            return {}
        acc = teacher_forced_accuracy(model, order, x0, answer, self.mask_id, extra=self.extra())
        return {f"tf_step{i}_acc": float(acc[i]) for i in range(1, self.path_len - 1)}

    def headline(self):
        return "path_acc"

    def describe(self):
        return {**super().describe(), "num_nodes": self.num_nodes, "degree": self.degree,
                "path_len": self.path_len, "reverse": self.reverse}
