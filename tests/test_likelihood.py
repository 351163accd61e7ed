"""Likelihood evaluation: exact NLL for AR, an honest Monte-Carlo NELBO for diffusion orders.

What "the perplexity bound of an MDM is never below its exact NLL" means here, precisely:
an MDM network p(x^i | z) induces, for every fixed generation order σ, a proper any-order AR
model p_σ(x) = Π_k p(x^{σ_k} | x^{σ_<k} visible, rest masked). Under the linear schedule the
NELBO of x equals the *average over the L! orders* of −log p_σ(x) (checked exactly below), so
by Jensen it is never below −log of the order-mixture p_mix(x) = mean_σ p_σ(x), a proper
distribution whose NLL we compute exactly by enumerating all V^L sequences. It *can* be below
the NLL of one particular order (e.g. left to right) for some x; the test shows that too, so
no one reads the bound as a bound on the left-to-right NLL.
"""
import itertools
import json
import math

import torch
import torch.nn.functional as F

from anyorder.objectives.nelbo import likelihood
from anyorder.model import ModelConfig, Transformer
from anyorder.orders import masks
from anyorder.objectives.nelbo import exact_nelbo
from anyorder.orders import Layout, build_order
from anyorder.orders.schedules import Linear


def small_model(V, seed=0, L=8):
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(vocab_size=V + 1, mask_id=V, d_model=16, n_layers=1, n_heads=2, max_len=L)).eval()
    with torch.no_grad():  # sharpen the random model so that orders disagree clearly
        m.head.weight.mul_(8.0)
    return m


@torch.no_grad()
def ar_nll_by_decoding(model, x0, mask_id):
    """Σ_i −log p(x^i | x^{<i}) position by position, as the AR decoder sees it (causal mask,
    x^{≥i} masked): independent of the training plan."""
    B, L = x0.shape
    layout = Layout.from_answer(torch.ones_like(x0, dtype=torch.bool))
    total = torch.zeros(B, dtype=torch.float64)
    for i in range(L):
        z = x0.clone()
        z[:, i:] = mask_id
        logp = F.log_softmax(model(z, attn_mask=masks.causal(layout)).double(), -1)
        total -= logp[:, i].gather(-1, x0[:, i:i + 1]).squeeze(-1)
    return total


def test_ar_likelihood_is_the_exact_nll_with_zero_variance():
    V, L = 5, 6
    model = small_model(V)
    x0 = torch.randint(0, V, (10, L), generator=torch.Generator().manual_seed(1))
    answer = torch.ones_like(x0, dtype=torch.bool)
    exact = float(ar_nll_by_decoding(model, x0, V).sum()) / x0.numel()
    order = build_order("ar")
    res = likelihood(model, order, x0, answer, V, samples=16, batch_size=4)
    assert res["bound"] == "exact NLL" and res["samples"] == 1 and res["stderr"] == 0.0
    assert abs(res["nelbo_per_token"] - exact) < 1e-5
    assert abs(res["ppl"] - math.exp(exact)) < 1e-4 * math.exp(exact)
    again = likelihood(model, order, x0, answer, V, samples=3, seed=7, batch_size=10)
    assert abs(again["nelbo_per_token"] - res["nelbo_per_token"]) < 1e-6  # no randomness at all


def test_random_order_monte_carlo_is_within_three_standard_errors_of_the_exact_nelbo():
    V, L = 3, 4
    model = small_model(V, seed=2)
    x0 = torch.randint(0, V, (5, L), generator=torch.Generator().manual_seed(3))
    answer = torch.ones_like(x0, dtype=torch.bool)
    logp_fn = lambda z: F.log_softmax(model(z).double(), -1)  # noqa: E731  (random order: bidirectional)
    exact = sum(exact_nelbo(logp_fn, x, a, Linear(), V) for x, a in zip(x0, answer)) / x0.numel()
    rows = x0.repeat(8, 1)  # 40 rows per replicate: t is stratified across them
    res = likelihood(model, build_order("random"), rows, torch.ones_like(rows, dtype=torch.bool), V,
                     samples=24, batch_size=40)
    assert res["bound"] == "NELBO (upper bound)" and res["samples"] == 24
    assert 0 < res["stderr"] < 0.05 * exact
    assert abs(res["nelbo_per_token"] - exact) < 3 * res["stderr"], (res["nelbo_per_token"], exact, res["stderr"])


@torch.no_grad()
def order_log_probs(model, seqs, V, L):
    """log p_σ(x) for every order σ (rows) and sequence x (columns), by the chain rule."""
    out = []
    for sigma in itertools.permutations(range(L)):
        z = torch.full_like(seqs, V)
        lp = torch.zeros(len(seqs), dtype=torch.float64)
        for i in sigma:
            logp = F.log_softmax(model(z).double(), -1)
            lp += logp[:, i].gather(-1, seqs[:, i:i + 1]).squeeze(-1)
            z[:, i] = seqs[:, i]
        out.append(lp)
    return torch.stack(out)  # [L!, V^L]


def test_mdm_perplexity_bound_is_never_below_the_exact_nll_of_the_model_it_defines():
    V, L = 3, 3
    model = small_model(V, seed=4)
    seqs = torch.tensor(list(itertools.product(range(V), repeat=L)))          # all 27 sequences
    logp = order_log_probs(model, seqs, V, L)                                 # [6, 27]
    # every order gives a proper distribution over the 27 sequences
    assert torch.allclose(logp.exp().sum(-1), torch.ones(len(logp), dtype=torch.float64), atol=1e-9)
    logp_fn = lambda z: F.log_softmax(model(z).double(), -1)  # noqa: E731
    ones = torch.ones(L, dtype=torch.bool)
    nelbo = torch.tensor([exact_nelbo(logp_fn, x, ones, Linear(), V) for x in seqs], dtype=torch.float64)
    # the linear-schedule NELBO is the average over orders of the order's NLL (AO-ARM identity)
    assert torch.allclose(nelbo, (-logp).mean(0), atol=1e-6)
    nll_mix = -(torch.logsumexp(logp, 0) - math.log(len(logp)))              # the order-mixture's exact NLL
    assert torch.allclose(torch.logsumexp(-nll_mix, 0).exp(), torch.tensor(1.0, dtype=torch.float64))
    assert bool((nelbo >= nll_mix - 1e-9).all())                              # never below, for every x
    assert float((nelbo - nll_mix).min()) > 0                                 # strictly, orders disagree
    # ... but it is not a bound on one fixed order's NLL: for some x it is below left-to-right's
    nll_ltr = -logp[0]
    assert bool((nelbo < nll_ltr).any()) and bool((nelbo > nll_ltr).any())
    # the Monte-Carlo estimate on data drawn from the mixture agrees: PPL bound >= exact PPL
    q = (-nll_mix).exp()
    idx = torch.multinomial(q, 200, replacement=True, generator=torch.Generator().manual_seed(0))
    data = seqs[idx]
    res = likelihood(model, build_order("random"), data, torch.ones_like(data, dtype=torch.bool), V, samples=16,
                     batch_size=200)
    exact_bound = float(nelbo[idx].sum()) / data.numel()
    exact_nll = float(nll_mix[idx].sum()) / data.numel()
    assert abs(res["nelbo_per_token"] - exact_bound) < 3 * res["stderr"]
    assert res["nelbo_per_token"] + 3 * res["stderr"] >= exact_nll and exact_bound > exact_nll


def test_cli_likelihood_of_a_text_run(tmp_path, monkeypatch, capsys):
    from anyorder.cli import main
    from anyorder.config import load_config
    from anyorder.experiment import load_run, train

    monkeypatch.chdir(tmp_path)
    for name, n in (("a", 80), ("b", 20)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"text": f"document {i} of {name}: " + "lorem ipsum " * (i % 7)}) + "\n")
    cfg = load_config(None, [
        "task={name: text, sources: [{name: files, paths: [a.jsonl], source: a}], "
        "zero_shot: [{name: files, paths: [b.jsonl], source: b}], tokenizer: byte, seq_len: 32, zero_shot_split: all, cache_dir: cache}",
        "order.name=ar", "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "train.steps=2",
        "train.batch_size=4", "train.warmup_steps=1", "train.progress=false", "eval.n=2",
        "decode=[{name: top_prob, k: 16}]", "name=tiny", "out_dir=runs"])
    run = train(cfg)
    assert main(["likelihood", str(run), "--split", "zero_shot", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["bound"] == "exact NLL" and res["stderr"] == 0 and res["split"] == "zero_shot"
    exp = load_run(run)
    x0, answer = exp.task.split_set("zero_shot")
    exact = float(ar_nll_by_decoding(exp.model, x0, exp.task.mask_id).sum()) / x0.numel()
    assert abs(res["nelbo_per_token"] - exact) < 1e-5 and res["tokens"] == x0.numel()
    assert main(["likelihood", str(run), "--split", "dev"]) == 2  # a clear error, not a traceback


def test_likelihood_of_a_lomdm_run_is_its_own_nelbo(tmp_path, monkeypatch):
    """`anyorder likelihood` on an order-`learned` run reports LoMDM's NELBO (L_main + L_velocity), a
    bound with a standard error (its (1, 0) = MDLM identity: tests/test_text_compare.py)."""
    import math

    from anyorder.config import load_config
    from anyorder.evaluation.likelihood import likelihood_of_run
    from anyorder.experiment import load_run, train

    monkeypatch.chdir(tmp_path)
    over = ["task.n_train=100", "task.n_eval=32", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
            "order.name=learned", "train.steps=3", "train.warmup_steps=1", "train.batch_size=4",
            "train.progress=false", "eval.n=8", "name=lo", "out_dir=runs"]
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    exp = load_run(train(load_config(str(root / "configs" / "sudoku4.yaml"), over)))
    res = likelihood_of_run(exp, "test", samples=3, n=32)
    assert res["bound"] == "NELBO (upper bound)" and res["order"] == "learned"
    assert res["stderr"] > 0 and res["velocity_per_token"] >= 0
    assert math.isclose(res["ppl"], math.exp(res["nelbo_per_token"]))
