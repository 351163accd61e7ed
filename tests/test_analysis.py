"""Diagnostics of seeds 003/004 (anyorder.analysis): numbers checked against hand computations."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from anyorder.analysis.distance import (bounds, distance_to_visible, first_masked, homogenisation, make_states,
                                        parallel_bounds)
from anyorder.analysis.easy_first import easy_first, spearman
from anyorder.analysis.factorization import kl_joint_vs_product, sudoku_gap, toy_gap
from anyorder.analysis.trace_stats import heatmap_matrix, split_stats, stage_masks, tokens_per_step
from anyorder.evaluation.saved import load_decode
from anyorder.analysis.zipf import (SEED_PPL_TABLE, fit_s, implied_probabilities, independence_ppl, zipf_bound,
                                    zipf_curve, zipf_weights)
from anyorder.cli import main
from anyorder.decoding.trace import Trace
from anyorder.orders import build_order

sys.path.insert(0, str(Path(__file__).parent))
from test_tasks_config_cli import tiny_cfg  # noqa: E402

SPEC_PPL = [9.5597, 13.0448, 14.7010, 15.6167, 16.1937, 16.5902, 16.8793, 17.0995]


# ----------------------------------------------------------------------------- Zipf
def test_zipf_ppl_matches_spec_and_cli(capsys):
    assert [round(v, 4) for v in independence_ppl(1.05, 150000, 8)] == SPEC_PPL
    assert main(["zipf", "--s", "1.05", "--vocab", "150000", "--max-parallel", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ppl"] == SPEC_PPL
    assert out["seed_table"] == SEED_PPL_TABLE
    implied = out["seed_implied_p_n"]
    assert implied[4] > implied[3]                       # the seed's rows: P_5 > P_4, not monotone
    assert all(a >= b for a, b in zip(out["p_n"], out["p_n"][1:]))   # the bound is monotone


def test_zipf_bound_closed_form():
    w1, w2 = zipf_weights(2.0, 3)                        # 1 + 1/4 + 1/9 = 49/36
    assert w1 == pytest.approx(36 / 49) and w2 == pytest.approx(9 / 49)
    assert zipf_bound(1, 2.0, 3) == pytest.approx(w1)    # P_1 = ω1
    r = w1 - w2
    # P_2 by one step of the recursion P_n <= r P_{n-1} + ω2
    assert zipf_bound(2, 2.0, 3) == pytest.approx(r * w1 + w2)
    assert zipf_bound(200, 2.0, 3) == pytest.approx(w2 / (1 - r))
    assert implied_probabilities(independence_ppl(2.0, 3, 4)) == pytest.approx(zipf_curve(4, 2.0, 3))


def test_fit_s_recovers_exponent():
    d = list(range(1, 9))
    s, rmse = fit_s(d, zipf_curve(8, 1.7, 50), 50)
    assert s == pytest.approx(1.7, abs=1e-5) and rmse < 1e-6


# ----------------------------------------------------------------------------- distance / bounds
def test_distance_on_hand_built_mask():
    #           pos: 0  1  2  3  4  5  6  7
    m = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 1],
                      [1, 1, 1, 1, 1, 1, 1, 1],
                      [1, 1, 0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    d = distance_to_visible(m)
    assert d.tolist() == [[0, 1, 2, 1, 0, 1, 2, 3],
                          [-1, -1, -1, -1, -1, -1, -1, -1],
                          [2, 1, 0, 0, 1, 2, 1, 0]]


def test_homogenisation_and_first_masked():
    argmax = torch.tensor([[5, 7, 7, 7, 2, 9], [1, 1, 2, 3, 3, 3]])
    masked = torch.ones(2, 6, dtype=torch.bool)
    masked[:, 0] = False
    dist = distance_to_visible(masked)                    # 0,1,2,3,4,5
    h = homogenisation(argmax, dist, masked, far=2)       # row0: 7,7,2,9 -> 2 of 4; row1: 2,3,3,3 -> 3 of 4
    assert h["share"] == pytest.approx(5 / 8) and h["positions"] == 8 and h["states"] == 2
    pos, ok = first_masked(masked, torch.ones_like(masked), 3)
    assert pos.tolist() == [[1, 2, 3], [1, 2, 3]] and ok.all()


def test_parallel_bounds_hand_example():
    b = bounds([0.9, 0.8, 0.7])
    assert b["upper_min"] == pytest.approx(0.7)
    assert b["independence"] == pytest.approx(0.504)
    assert b["lower_bonferroni"] == pytest.approx(0.4)     # 2.4 - 2
    assert bounds([0.5, 0.4])["lower_bonferroni"] == 0.0


def test_parallel_bounds_on_a_model_bracket_and_chain(tiny_model):
    from conftest import make_batch

    x0, answer = make_batch(B=4, L=10, prompt=3, vocab=8)
    order = build_order("random")
    x, masked = make_states("initial", x0, answer, 8, torch.Generator().manual_seed(0))
    logits = tiny_model(x)
    p = torch.softmax(logits.double(), -1)
    maxp, argmax = p.detach().max(-1)
    rows = parallel_bounds(tiny_model, order, x, masked, answer, maxp, argmax, 3)
    # n = 1: all four equal the first masked position's max probability
    assert rows[0]["upper_min"] == pytest.approx(float(maxp[:, 3].mean()))
    assert rows[0]["chain"] == pytest.approx(rows[0]["independence"])
    # n = 2, by hand: the chain rule reveals the first token then reads the second's conditional
    x2 = x.clone()
    x2[:, 3] = argmax[:, 3]
    with torch.no_grad():
        p2 = torch.softmax(tiny_model(x2).double(), -1)[torch.arange(4), 4, argmax[:, 4]]
    assert rows[1]["chain"] == pytest.approx(float((maxp[:, 3] * p2).mean()))
    for r in rows:
        assert r["lower_bonferroni"] <= r["independence"] <= r["upper_min"] + 1e-12


# ----------------------------------------------------------------------------- trace stats
def _trace(steps, answer=None):
    fs = torch.tensor(steps)
    ans = torch.ones_like(fs, dtype=torch.bool) if answer is None else answer
    return Trace(fs, torch.zeros(fs.shape, dtype=torch.float64), ans, fs.max(-1).values + 1)


def test_trace_splits_by_correctness_and_stage():
    tr = _trace([[0, 1, 2, 3, 4, 5],        # left to right: τ = 1, AFP 1
                 [5, 4, 3, 2, 1, 0],        # right to left: τ = -1
                 [0, 0, 1, 1, 2, 2]])       # pairs: AFP 2, τ_b = 12/sqrt(15*12)
    split = split_stats(tr, correct=torch.tensor([True, False, True]))
    tau3 = 12 / math.sqrt(15 * 12)
    assert split["all"]["afp"] == pytest.approx((1 + 1 + 2) / 3)
    assert split["correct"]["kendall_tau"] == pytest.approx((1 + tau3) / 2)
    assert split["incorrect"]["kendall_tau"] == pytest.approx(-1.0) and split["incorrect"]["rows"] == 1
    # stages of 6 positions: {0,1} {2,3} {4,5}; row 3 finalises each stage in one step (AFP 2, τ NaN)
    assert [m.nonzero()[:, 1].tolist()[:2] for m in stage_masks(tr.answer).values()] == [[0, 1], [2, 3], [4, 5]]
    assert split["stage_first"]["afp"] == pytest.approx((1 + 1 + 2) / 3)
    assert split["stage_middle"]["kendall_tau"] == pytest.approx(0.0)  # mean of 1 and -1 (row 3 NaN)
    assert tokens_per_step(tr) == {1: 12, 2: 3}
    h = heatmap_matrix(tr)
    assert h.shape == (6, 6) and h.sum(0).tolist() == pytest.approx([4 / 3] * 3 + [2 / 3] * 3)
    assert h[0, 0] == pytest.approx(2 / 3) and h[5, 0] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- factorisation gap
def test_toy_gap_equals_hand_mutual_information():
    n = 100
    joint = {"AB": 34, "AB'": 21, "A'B": 35, "A'B'": 10}
    pa = {"A": (34 + 21) / n, "A'": (35 + 10) / n}       # 0.55 / 0.45
    pb = {"B": (34 + 35) / n, "B'": (21 + 10) / n}       # 0.69 / 0.31
    by_hand = (34 / n * math.log(0.34 / (0.55 * 0.69)) + 21 / n * math.log(0.21 / (0.55 * 0.31))
               + 35 / n * math.log(0.35 / (0.45 * 0.69)) + 10 / n * math.log(0.10 / (0.45 * 0.31)))
    assert sum(joint.values()) == n and pa["A"] == 0.55 and pb["B"] == 0.69
    assert toy_gap() == pytest.approx(by_hand, rel=1e-12)
    assert toy_gap() == pytest.approx(0.015012, abs=1e-6)         # nats
    # the model version: uniform marginals over {A, A'} x {B, B'} give log 4 - H(joint)
    from anyorder.tasks.toy import A, A_, B, B_
    flat = [{A: 0.5, A_: 0.5}, {B: 0.5, B_: 0.5}]
    h = -sum(c / n * math.log(c / n) for c in joint.values())
    assert toy_gap(flat) == pytest.approx(math.log(4) - h)
    assert kl_joint_vs_product({(0, 0): 1.0}, [{0: 0.5}, {0: 0.25}]) == pytest.approx(math.log(8))
    # a model's marginals (an untrained toy-sized transformer): the same sum with its q's
    from anyorder.analysis.factorization import toy_model_marginals
    from anyorder.model import ModelConfig, Transformer
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=107, mask_id=106, d_model=16, n_layers=1, n_heads=2, max_len=8))
    qa, qb = toy_model_marginals(model, 106)
    counts = {(A, B): 34, (A, B_): 21, (A_, B): 35, (A_, B_): 10}
    by_hand_model = sum(c / n * math.log(c / n / (float(qa[a]) * float(qb[b]))) for (a, b), c in counts.items())
    assert toy_gap([qa, qb]) == pytest.approx(by_hand_model, rel=1e-12) and by_hand_model > toy_gap()
    # = mutual information + each marginal's own KL (the decomposition the docs state)
    kl_a = 0.55 * math.log(0.55 / float(qa[A])) + 0.45 * math.log(0.45 / float(qa[A_]))
    kl_b = 0.69 * math.log(0.69 / float(qb[B])) + 0.31 * math.log(0.31 / float(qb[B_]))
    assert toy_gap([qa, qb]) == pytest.approx(toy_gap() + kl_a + kl_b, rel=1e-10)


class _Oracle(torch.nn.Module):
    """Puts probability q on the solution token of every position (uniform on the rest)."""

    def __init__(self, sol, vocab, mask_id, q):
        super().__init__()
        self.sol, self.vocab, self.q = sol, vocab, q
        self.cfg = type("C", (), {"mask_id": mask_id})()

    def forward(self, x, attn_mask=None, extra=None, **kw):
        p = torch.full((*x.shape, self.vocab), (1 - self.q) / (self.vocab - 1), dtype=torch.float64)
        p.scatter_(-1, self.sol[: len(x)].unsqueeze(-1), self.q)
        return p.log()


def test_sudoku_gap_point_mass_and_easy_first():
    from anyorder.tasks import build_task

    task = build_task({"name": "sudoku", "size": 4, "n_clues": 6, "n_train": 10, "n_eval": 4})
    x0, answer = task.eval_set(4)
    order = build_order("random")
    model = _Oracle(x0, task.vocab_size, task.mask_id, q=0.8)
    # commit answer cells 2 per step left to right: steps 0..7
    fs = torch.where(answer, (answer.long().cumsum(-1) - 1) // 2, torch.full_like(x0, -1))
    gap = sudoku_gap(model, order, task, x0, answer, x0.clone(), fs)
    assert list(gap) == [2] and gap[2]["steps"] == 32 and gap[2]["consistent_steps"] == 32
    assert gap[2]["gap_per_step"] == pytest.approx(-2 * math.log(0.8))
    assert gap[2]["gap_per_token"] == pytest.approx(-math.log(0.8)) and gap[2]["wrong_commit_rate"] == 0
    # a wrong commit at step 0 makes later states inconsistent: only step 0 of that row is counted
    bad = x0.clone()
    bad[0, 17] = bad[0, 17] % 4 + 1
    g = sudoku_gap(model, order, task, x0, answer, bad, fs)[2]
    assert g["consistent_steps"] == 32 - 7 and g["wrong_commit_rate"] == pytest.approx(1 / 64)
    # easy first: filling blanks by increasing candidate count gives τ = 1 where defined
    cand = torch.from_numpy(np.asarray(__import__("anyorder.tasks.sudoku_core", fromlist=["x"])
                                       .candidates_count(x0[:, :16].numpy()), dtype=np.int64))
    fs2 = torch.full_like(x0, -1)
    fs2[:, 17:] = cand * 16 + torch.arange(16)            # step grows with candidates
    ef = easy_first(task, x0, x0.clone(), fs2)
    assert ef["kendall_tau_step_vs_candidates"] > 0.6 and ef["spearman_pooled"] > 0.6
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


# ----------------------------------------------------------------------------- end to end
def test_analyze_report_end_to_end(tmp_path, capsys):
    from anyorder.experiment import train

    run = train(tiny_cfg(tmp_path))
    out = tmp_path / "rep"
    assert main(["analyze", str(run), "--n", "12", "--out", str(out), "--decoder", "top_prob", "--k", "4",
                 "--max-parallel", "3", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    res = json.loads((out / "results.json").read_text())
    dec = res["decoders"]["top_prob(k=4)"]
    assert dec["split"]["all"]["afp"] == pytest.approx(4.0) and printed["decoders"]["top_prob(k=4)"]["afp"] == 4.0
    assert dec["tokens_per_step"] == {"4": 12 * 4}
    assert set(dec["split"]) == {"all", "correct", "incorrect", "stage_first", "stage_middle", "stage_last"}
    assert dec["split"]["correct"]["rows"] + dec["split"]["incorrect"]["rows"] == 12
    assert list(dec["factorisation_gap"]) == ["4"] and dec["factorisation_gap"]["4"]["steps"] == 48
    assert "kendall_tau_step_vs_candidates" in dec["easy_first"]
    assert res["zipf"]["vocab"] == 4 and res["zipf"]["s_fit"] > 0
    assert res["zipf"]["bound"]["1"] == pytest.approx(zipf_weights(1.05, 4)[0])
    assert [r["n"] for r in res["distance"]["parallel"]] == [1, 2, 3]
    curve = res["distance"]["curve_by_pattern"]["initial"]
    assert list(curve)[:3] == ["1", "2", "3"] and all(v[1] == 12 for v in curve.values())   # one per row
    report = (out / "report.md").read_text()
    for key in ("Kendall", "Homogenisation", "Parallel-sampling", "Factorisation gap", "Easy first", "fitted s"):
        assert key in report
    for f in dec["files"] + ["distance.png"]:
        assert (out / f).stat().st_size > 1000 and f in report
    # every decode saved with its events, and the viewer of them linked from the report
    assert "[viewer.html](viewer.html)" in report and res["viewer"] == "viewer.html"
    saved = load_decode(out / "decodes" / "top_prob_k_4.safetensors")
    assert torch.equal(saved["trace"].events.finalize(saved["finalize_step"].shape)[0], saved["finalize_step"])
    assert f'"label":"MDLM (random) / top_prob(k=4)"' in (out / "viewer.html").read_text()
