"""LoMDM: the learned generation order (a per-position polynomial schedule whose exponent a head
predicts, trained jointly with the model) end to end: losses, gradients, decoders, training."""
import itertools
from types import SimpleNamespace

import pytest
import torch

from anyorder.decoding import build_decoder
from anyorder.model import ModelConfig, Transformer
from anyorder.bench import bench_lomdm_ratio
from anyorder.model.lomdm import LoMDM, exponents, normsig
from anyorder.objectives.lomdm import lomdm_loss, loss_terms, velocity_loss
from anyorder.objectives.nelbo import plan_loss
from anyorder.orders.plans import masked_plan
from anyorder.orders import build_order
from anyorder.orders.schedules import build_schedule

from conftest import make_batch

CFG = dict(vocab_size=9, mask_id=8, d_model=32, n_layers=2, n_heads=2, max_len=64)


def lomdm(c1=0.7, c2=0.65, seed=0, sharp=0.0):
    torch.manual_seed(seed)
    m = LoMDM(Transformer(ModelConfig(**CFG)), c1, c2)
    if sharp:  # spread the exponents so the schedule (and its gradient) is far from uniform
        for head in (m.g_phi, m.g_psi):
            torch.nn.init.normal_(head.mlp[-1].weight, std=sharp)
    return m


# -- (1) c2 = 0 is the polynomial schedule, (1, 0) is MDLM -----------------------------------
@pytest.mark.parametrize("c1,schedule", [(1.0, "linear"), (0.7, {"name": "polynomial", "c": 0.7}),
                                         (2.0, {"name": "polynomial", "c": 2.0})])
def test_fixed_exponent_is_the_polynomial_nelbo(c1, schedule):
    m = lomdm(c1, 0.0)
    x0, answer = make_batch(B=6, L=12, prompt=3)
    order = build_order({"name": "random", "schedule": schedule})
    layout = order.layout(answer)
    # same generator: LoMDM's first mask and t are exactly the fixed order's plan
    loss, stats = lomdm_loss(m, x0, answer, torch.Generator().manual_seed(5))
    plan = order.train_plan(x0, layout, 8, torch.Generator().manual_seed(5))
    ref = plan_loss(m.backbone, plan)[0].detach()
    assert stats["nelbo_z1"] == pytest.approx(float(ref), rel=1e-5)
    assert stats["velocity"] == 0.0  # k̂ = k = c1 whatever the heads say
    # the value is the NELBO estimate ½(L(z¹) + L(z²)); RLOO only carries gradient
    assert float(loss.detach()) == pytest.approx(0.5 * (stats["nelbo_z1"] + stats["nelbo_z2"]), rel=1e-6)
    assert stats["rloo"] != 0.0
    # both masks, term by term, with explicit t: weights are the schedule's A_i(t) (1/t for MDLM)
    g = torch.Generator().manual_seed(1)
    t = torch.rand(6, generator=g) * 0.9 + 0.05
    masks = [(torch.rand(6, 12, generator=g) < 0.5) & answer for _ in range(2)]
    k = m.forward_exponent(x0, answer)
    T = loss_terms(m, x0, answer, t, masks, k)
    _, A = build_schedule(schedule).velocity(t, layout.aidx, layout.n_answer)
    for j, mk in enumerate(masks):
        p = masked_plan(x0, layout, 8, mk, A, t.view(-1, 1).expand(6, 12), None)
        ref = plan_loss(m.backbone, p)[0].detach()
        assert float(T["main"][j].detach().sum() / answer.sum()) == pytest.approx(float(ref), rel=1e-5)
    if schedule == "linear":
        assert torch.allclose(A[answer], (1 / t.double()).view(-1, 1).expand(6, 12)[answer])


def test_c1_c2_validated():
    for c1, c2 in [(0.5, 0.5), (0.5, 0.7), (1.0, -0.1), (0.0, 0.0)]:
        with pytest.raises(ValueError, match="c1 > c2 >= 0"):
            lomdm(c1, c2)
    with pytest.raises(ValueError, match="c1 > c2"):
        build_order({"name": "learned", "c1": 0.3, "c2": 0.4})


def test_normsig_and_exponent_range():
    v = torch.randn(4, 10) * 5
    answer = torch.rand(4, 10) < 0.7
    answer[:, 0] = True
    ns = normsig(v, answer)
    assert torch.allclose((ns * answer).sum(-1), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    assert (ns[~answer] == 0).all() and (ns.abs() < 1).all()
    k = exponents(v, answer, 0.7, 0.65)
    assert (k > 0.05).all() and (k < 1.35).all()


# -- (2) L_velocity ≥ 0, zero iff the velocities agree -----------------------------------------
def test_velocity_loss_zero_iff_equal():
    g = torch.Generator().manual_seed(0)
    A = torch.rand(1000, generator=g, dtype=torch.float64) * 20 + 1e-3
    assert torch.equal(velocity_loss(A, A), torch.zeros_like(A))
    A_hat = A * torch.exp(torch.randn(1000, generator=g, dtype=torch.float64))
    v = velocity_loss(A, A_hat)
    assert (v > 0).all()
    near = velocity_loss(A, A * (1 + 1e-4))  # second order in the gap: A·δ²/2
    assert (near > 0).all() and torch.allclose(near, A * 1e-8 / 2, rtol=1e-3)


def test_velocity_term_in_the_loss():
    m = lomdm(sharp=2.0)
    x0, answer = make_batch(B=4, L=10, prompt=2)
    loss, stats = lomdm_loss(m, x0, answer, torch.Generator().manual_seed(0))
    assert stats["velocity"] > 0  # g_φ ≠ g_ψ
    m.g_psi.load_state_dict(m.g_phi.state_dict())
    # same head on f(z) vs f(x): zero only where the features agree; on the clean input exactly 0
    k = m.forward_exponent(x0, answer)
    T = loss_terms(m, x0, answer, torch.full((4,), 0.5), [torch.zeros_like(answer)], k)
    assert torch.allclose(T["k_hat"][0][answer], k[answer], atol=1e-6)


# -- (3) RLOO gives the exact gradient of E_{z ~ q_φ(·|x,t)}[ℓ(z)] -------------------------------
def test_rloo_gradient_matches_exact_enumeration():
    """Objective (per answer token, t uniform over TS, one fixed x of 4 tokens):

        J(φ) = mean_{t ∈ TS} Σ_z q_φ(z | x, t) · ℓ_φ(z, t) / 4,   ℓ = Σ_masked A_φ·CE + L_velocity,

    z over all 2^4 masks, so ∇_φ J is exact: the pathwise part through A_φ and the score part
    through q_φ. The estimator is ``lomdm_loss`` on N copies of x (two masks each). φ's gradient
    factors through the 4 head outputs v = g_φ(f(x)) (identical rows), so we compare ∂J/∂v, with
    a standard error from the N independent rows, and then the whole φ gradient."""
    torch.manual_seed(1)
    m = LoMDM(Transformer(ModelConfig(vocab_size=9, mask_id=8, d_model=16, n_layers=1, n_heads=2, max_len=8)),
              0.7, 0.65)
    for head in (m.g_phi, m.g_psi):
        torch.nn.init.normal_(head.mlp[-1].weight, std=3.0)
    L, TS, N = 4, [0.5, 0.8], 40000
    x0, answer = torch.tensor([[1, 5, 2, 7]]), torch.ones(1, L, dtype=torch.bool)
    phi = list(m.g_phi.parameters())
    cap = {}

    def keep_v(module, inp, out):
        out.retain_grad()
        cap["v"] = out

    m.g_phi.register_forward_hook(keep_v)
    masks = [torch.tensor([list(p)], dtype=torch.bool) for p in itertools.product([0, 1], repeat=L)]

    def exact(score=True):
        k = m.forward_exponent(x0, answer)
        J = 0.0
        for t in TS:
            T = loss_terms(m, x0, answer, torch.tensor([t]), masks, k)
            q = T["logq"].exp() if score else T["logq"].exp().detach()
            assert float(T["logq"].detach().exp().sum()) == pytest.approx(1.0, abs=1e-6)
            J = J + (q * (T["main"] + T["velocity"])).sum() / (L * len(TS))
        grads = torch.autograd.grad(J, [cap["v"]] + phi)
        return grads[0][0].double(), torch.cat([g.flatten() for g in grads[1:]]).double()

    ex_v, ex_phi = exact()
    path_v, path_phi = exact(score=False)  # what ignoring that z is drawn from q_φ would give
    tr = torch.tensor(TS).repeat_interleave(N // len(TS))
    loss, _ = lomdm_loss(m, x0.expand(N, L), answer.expand(N, L), torch.Generator().manual_seed(0), t=tr)
    grads = torch.autograd.grad(loss, [cap["v"]] + phi)
    rows = grads[0].double() * N                      # row b's own estimate of ∂J/∂v
    mean, se = rows.mean(0), rows.std(0) / N ** 0.5
    assert ((mean - ex_v) / se).abs().max() < 4.5
    assert ((mean - path_v) / se).abs().max() > 8     # the test can tell the two apart
    est_phi = torch.cat([g.flatten() for g in grads[1:]]).double()
    assert (est_phi - ex_phi).norm() < 0.15 * ex_phi.norm()
    assert (path_phi - ex_phi).norm() > 0.5 * ex_phi.norm()


def test_rloo_term_is_needed():
    """The pathwise gradient alone (drop the RLOO term) is biased: the test above has power."""
    m = lomdm(sharp=3.0, seed=1)
    L = 4
    x0, answer = torch.tensor([[1, 5, 2, 7]]), torch.ones(1, L, dtype=torch.bool)
    phi = list(m.g_phi.parameters())
    k = m.forward_exponent(x0, answer)
    masks = [torch.tensor([list(p)], dtype=torch.bool) for p in itertools.product([0, 1], repeat=L)]
    T = loss_terms(m, x0, answer, torch.tensor([0.5]), masks, k)
    ell = T["main"] + T["velocity"]
    q = T["logq"].exp()
    full = torch.autograd.grad((q * ell).sum(), phi, retain_graph=True)
    path = torch.autograd.grad((q.detach() * ell).sum(), phi)
    f, p = torch.cat([g.flatten() for g in full]), torch.cat([g.flatten() for g in path])
    assert (f - p).norm() > 0.2 * f.norm()
    assert float(q.detach().sum()) == pytest.approx(1.0, abs=1e-6)  # q_φ is a distribution over the 16 masks


# -- (4) learned decoders -----------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["learned_ancestral", {"name": "learned_ancestral", "steps": 5, "temperature": 1.0},
                                  "learned_velocity", {"name": "learned_velocity", "k": 2, "temperature": 0.8}])
def test_learned_decoders_batched_equals_row_by_row(spec):
    m = lomdm(sharp=2.0).eval()
    x0, answer = make_batch(B=4, L=14, prompt=4, seed=3)
    x = torch.where(answer, torch.full_like(x0, 8), x0)
    order = build_order("learned")
    full = build_decoder(spec).decode(m, order, x, answer, row_seeds=[10, 11, 12, 13])
    assert not (full.tokens == 8).any() and torch.equal(full.tokens[~answer], x0[~answer])
    for b in range(4):
        one = build_decoder(spec).decode(m, order, x[b:b + 1], answer[b:b + 1], row_seeds=[10 + b])
        assert torch.equal(one.tokens[0], full.tokens[b])
        assert torch.equal(one.trace.finalize_step[0], full.trace.finalize_step[b])
        assert int(one.trace.nfe[0]) == int(full.trace.nfe[b])


class FixedExponent(torch.nn.Module):
    """A stub model with uniform logits and a given k̂ per position."""

    def __init__(self, k_hat):
        super().__init__()
        self.k_hat = torch.as_tensor(k_hat, dtype=torch.float64)
        self.cfg = SimpleNamespace(mask_id=3, vocab_size=4, time_conditioning=False)

    def logits_and_exponent(self, z, answer, attn_mask=None, extra=None, t=None):
        logits = torch.zeros(*z.shape, 4)
        logits[..., 3] = float("-inf")
        return logits, self.k_hat.expand(z.shape)


def test_learned_ancestral_unmask_probability():
    """First step of a T-step grid: P(unmask) = 1 − ((T−1)/T)^k̂."""
    k_hat, T, B = [0.2, 1.0, 3.0], 4, 4000
    x = torch.full((B, 3), 3)
    answer = torch.ones(B, 3, dtype=torch.bool)
    res = build_decoder({"name": "learned_ancestral", "steps": T}).decode(
        FixedExponent(k_hat), build_order("learned"), x, answer)
    first = (res.trace.finalize_step == 0).double().mean(0)
    expect = 1 - torch.tensor([(1 - 1 / T) ** k for k in k_hat], dtype=torch.float64)
    assert torch.allclose(first, expect, atol=4 * (0.25 / B) ** 0.5)
    assert (res.trace.finalize_step < T).all()  # the grid ends with everything unmasked


def test_learned_velocity_commits_fastest_first():
    k_hat = [0.3, 1.2, 0.9, 0.1, 1.0]
    res = build_decoder("learned_velocity").decode(
        FixedExponent(k_hat), build_order("learned"), torch.full((1, 5), 3), torch.ones(1, 5, dtype=torch.bool))
    assert res.trace.finalize_step[0].tolist() == [3, 0, 2, 4, 1]


def test_learned_ancestral_without_heads_is_mdlm_ancestral(tiny_model):
    x0, answer = make_batch(B=3, L=12, prompt=3, seed=2)
    x = torch.where(answer, torch.full_like(x0, 8), x0)
    order = build_order("random")
    for extra in ({}, {"steps": 4, "temperature": 1.0}):
        a = build_decoder({"name": "ancestral", **extra}).decode(tiny_model, order, x, answer)
        b = build_decoder({"name": "learned_ancestral", **extra}).decode(tiny_model, order, x, answer)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.trace.nfe, b.trace.nfe)


def test_learned_order_wraps_and_refuses_a_fixed_plan():
    order = build_order({"name": "learned", "c1": 1.0, "c2": 0.5})
    m = order.wrap(Transformer(ModelConfig(**CFG)))
    assert (m.c1, m.c2) == (1.0, 0.5) and order.default_decoder == "learned_ancestral"
    x0, answer = make_batch()
    with pytest.raises(ValueError, match="lomdm_loss"):
        order.train_plan(x0, order.layout(answer), 8, torch.Generator())
    groups = m.param_groups(1e-3, head_lr=1e-2)
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == sum(p.numel() for p in m.parameters()) and groups[1]["lr"] == 1e-2


def test_lomdm_step_costs_at_most_3_5_mdlm_steps():
    """Counted training FLOPs (forward + backward) of one LoMDM step against one MDLM step of the
    same backbone, batch and length: 3 backbone passes (one without gradient) plus two head blocks.
    A count, not a timing (`anyorder bench train` times it: key ``lomdm_vs_mdlm_step``)."""
    from anyorder.analysis.flops import count_step_flops

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=65, mask_id=64, d_model=128, n_layers=4, n_heads=4, max_len=64)
    x0, answer = torch.randint(0, 64, (32, 64)), torch.ones(32, 64, dtype=torch.bool)
    order = build_order("random")
    mdlm = count_step_flops(Transformer(cfg), lambda m: plan_loss(
        m, order.train_plan(x0, order.layout(answer), 64, torch.Generator().manual_seed(0)))[0])
    lomdm_flops = count_step_flops(LoMDM(Transformer(cfg)),
                                   lambda m: lomdm_loss(m, x0, answer, torch.Generator().manual_seed(0))[0])
    assert 2.5 < lomdm_flops / mdlm <= 3.5, lomdm_flops / mdlm


def test_the_step_cost_benchmark_runs():
    r = bench_lomdm_ratio(n_layers=1, d_model=32, batch=4, length=8, steps=1)
    assert r["lomdm_s_per_step"] > 0 and r["mdlm_s_per_step"] > 0 and r["ratio"] == pytest.approx(
        r["lomdm_s_per_step"] / r["mdlm_s_per_step"])


def test_learned_order_trains_from_a_config(tmp_path):
    """`anyorder train ... order.name=learned` trains LoMDM end to end and decodes with its decoders."""
    from pathlib import Path

    from anyorder.config import load_config
    from anyorder.experiment import evaluate, load_run, train

    root = Path(__file__).resolve().parents[1]
    over = ["order.name=learned", "task.n_train=100", "task.n_eval=16", "model.d_model=32", "model.n_layers=1",
            "model.n_heads=2", "train.steps=3", "train.warmup_steps=1", "train.batch_size=4",
            "train.progress=false", "eval.n=8", "decode=[learned_ancestral]", f"out_dir={tmp_path}", "name=lo"]
    run = train(load_config(str(root / "configs" / "sudoku4.yaml"), over))
    exp = load_run(run)
    assert hasattr(exp.model, "g_phi") and exp.objective.describe()["name"] == "lomdm"  # heads restored
    for name in ("learned_ancestral", "learned_velocity"):
        res = evaluate(exp, {"name": name}, n=8)
        assert 0.0 <= res["cell_acc"] <= 1.0 and res["nfe"] >= 1


def test_learned_order_heads_get_their_own_learning_rate(tmp_path):
    from pathlib import Path

    from anyorder.config import load_config
    from anyorder.experiment import build, make_loss_fn
    from anyorder.train import TrainConfig, Trainer

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(str(root / "configs" / "sudoku4.yaml"), [
        "order={name: learned, head_lr: 0.003}", "task.n_train=50", "task.n_eval=8", "model.d_model=32",
        "model.n_layers=1", "model.n_heads=2", "train.lr=0.001"])
    exp = build(cfg)
    scale = 0.003 / 0.001
    tcfg = TrainConfig(steps=2, batch_size=2, lr=0.001, warmup_steps=0, progress=False)
    tr = Trainer(exp.model, make_loss_fn(exp), tcfg, tmp_path / "r",
                 lr_scale=lambda n: scale if exp.model.is_head(n) else 1.0)
    tr.fit()
    lrs = sorted({round(g["lr"] / g["lr_scale"], 12) for g in tr.optimizer.param_groups})
    assert len(lrs) == 1                                   # one schedule, scaled per group
    head_groups = [g for g in tr.optimizer.param_groups if g["lr_scale"] != 1.0]
    assert head_groups and all(abs(g["lr_scale"] - 3.0) < 1e-12 for g in head_groups)
    n_head = sum(p.numel() for g in head_groups for p in g["params"])
    assert n_head == sum(p.numel() for n, p in exp.model.named_parameters() if exp.model.is_head(n))


def test_centered_normsig_ignores_a_common_shift_of_the_logits():
    """center=True: k(v + c) == k(v) exactly; the uncentered NormSig is not shift-invariant (σ saturates: a
    large common shift flattens every k to c1, the collapse the option prevents)."""

    gen = torch.Generator().manual_seed(0)
    v = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    answer = torch.ones(3, 7, dtype=torch.bool)
    answer[0, :2] = False
    k = exponents(v, answer, 0.7, 0.65, center=True)
    assert torch.allclose(exponents(v - 14.0, answer, 0.7, 0.65, center=True), k, atol=1e-12)
    assert k[answer].std() > 0.05
    flat = exponents(v - 14.0, answer, 0.7, 0.65)  # uncentered NormSig, saturated: every k ≈ c1
    assert (flat[answer] - 0.7).abs().max() < 1e-5


def test_learned_order_center_option_reaches_the_model():
    from anyorder.model import ModelConfig, Transformer
    from anyorder.orders import build_order

    order = build_order({"name": "learned", "center": True})
    model = order.wrap(Transformer(ModelConfig(vocab_size=9, mask_id=8, d_model=16, n_layers=1, n_heads=2, max_len=8)))
    assert model.center and order.describe()["center"] == "True"
