"""Star-graph generator: one arm reaches the goal, the path is valid, impossible settings fail clearly."""
import numpy as np
import pytest
import torch

from anyorder.tasks import build_task
from anyorder.tasks.star_graph import star_graph


def test_exactly_one_arm_reaches_the_goal_and_path_is_valid():
    rng = np.random.default_rng(0)
    for _ in range(50):
        edges, path = star_graph(3, 5, 20, rng)
        assert len(edges) == 3 * 4 and len(path) == 5
        src, goal = path[0], path[-1]
        succ = {}
        for u, v in edges:
            succ.setdefault(int(u), []).append(int(v))
        assert len(succ[int(src)]) == 3                          # three arms leave the source
        reached = 0
        for first in succ[int(src)]:                             # walk every arm to its end
            node, walk = first, [int(src), first]
            while node in succ:
                assert len(succ[node]) == 1                      # arms do not branch
                node = succ[node][0]
                walk.append(node)
            assert len(walk) == 5
            reached += walk[-1] == goal
            if walk[-1] == goal:
                assert walk == [int(x) for x in path]
        assert reached == 1
        assert len(set(edges.reshape(-1).tolist())) == 13        # distinct labels: 3*4 + source


def test_task_encoding_and_metrics():
    task = build_task({"name": "star_graph", "num_nodes": 20, "degree": 3, "path_len": 5, "n_train": 50, "n_eval": 10})
    assert task.seq_len == 3 * 12 + 3 + 5 and task.vocab_size == 24
    x0, answer = task.eval_set(10)
    for row in x0:
        assert task.is_valid_path(row, row[task.prompt_len:].tolist())
        assert row[3 * 12 - 1] == task.slash and row[task.prompt_len - 1] == task.eq
    assert task.metrics(x0, x0, answer) == {"path_acc": 1.0, "token_acc": 1.0, "step1_acc": 1.0, "step2_acc": 1.0,
                                            "step3_acc": 1.0}
    wrong = x0.clone()
    wrong[:, task.prompt_len + 1] = (wrong[:, task.prompt_len + 1] + 1) % 20
    m = task.metrics(wrong, x0, answer)
    assert m["path_acc"] == 0.0 and abs(m["token_acc"] - 0.8) < 1e-9
    rev = build_task({"name": "star_graph", "num_nodes": 20, "degree": 3, "path_len": 5, "n_train": 5, "n_eval": 5,
                      "reverse": True})
    r = rev.eval_set(5)[0][0]
    assert r[rev.prompt_len] == r[3 * 12 + 1] and r[-1] == r[3 * 12]  # goal first, source last


def test_impossible_settings():
    with pytest.raises(ValueError, match=r"num_nodes=10 is too small.*needs degree\*\(path_len-1\)\+1 = 13"):
        build_task({"name": "star_graph", "num_nodes": 10, "degree": 3, "path_len": 5})
    with pytest.raises(ValueError, match="path_len must be an integer >= 2"):
        build_task({"name": "star_graph", "path_len": 1})
