"""The efficient training plans compute the same objective as the generic estimator."""
import pytest
import torch

from anyorder.orders import masks
from anyorder.objectives.nelbo import exact_nelbo, plan_logits, plan_loss
from anyorder.orders import build_order
from anyorder.orders.schedules import EpsAR, EpsBlock, Linear

from conftest import make_batch


def _ar_nll(model, x0, answer):
    order = build_order("ar")
    plan = order.train_plan(x0, order.layout(answer), model.cfg.mask_id, torch.Generator().manual_seed(0))
    loss, _ = plan_loss(model, plan)
    return float(loss.detach()) * int(answer.sum())


def test_eps_ar_nelbo_matches_teacher_forced_ar_nll(tiny_model):
    """SPEC §2: the generic NELBO under ε-AR -> AR teacher-forced NLL of the same weights as ε -> 0."""
    with torch.no_grad():  # sharpen the random model so its predictions depend on context
        for p in tiny_model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    x0, answer = make_batch(B=1, L=6, prompt=2, seed=1)
    nll = _ar_nll(tiny_model, x0, answer)
    layout = build_order("ar").layout(answer)

    def logp_fn(z):
        lay = build_order("ar").layout(answer.expand(z.shape[0], -1))
        return torch.log_softmax(tiny_model(z, attn_mask=masks.causal(lay)).double(), -1)

    gaps = []
    for eps in (1e-1, 1e-2, 1e-3):
        nelbo = exact_nelbo(logp_fn, x0[0], answer[0], EpsAR(eps), tiny_model.cfg.mask_id, n_quad=32)
        gaps.append(abs(nelbo - nll) / nll)
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[0] > 0.005                 # at ε = 0.1 the schedule is visibly not AR yet (1.4%)
    assert gaps[2] < 0.01 * 0.1, gaps      # 1.5e-4 measured; the issue asks for < 1%
    assert nll > 0


def test_exact_nelbo_linear_is_upper_bound_shape(tiny_model):
    """Under the linear schedule the exact NELBO is finite and positive; MC estimate agrees with it."""
    x0, answer = make_batch(B=1, L=5, prompt=1, seed=2)
    mask_id = tiny_model.cfg.mask_id

    def logp_fn(z):
        return torch.log_softmax(tiny_model(z).double(), -1)

    exact = exact_nelbo(logp_fn, x0[0], answer[0], Linear(), mask_id, n_quad=64)
    order = build_order("random")
    B = 4096
    xb, ab = x0.expand(B, -1), answer.expand(B, -1)
    with torch.no_grad():
        loss, _ = plan_loss(tiny_model, order.train_plan(xb, order.layout(ab), mask_id, torch.Generator().manual_seed(3)))
    mc = float(loss) * int(answer.sum())
    assert abs(mc - exact) / exact < 0.03, (mc, exact)


def test_vectorised_block_loss_equals_per_block_loop(tiny_model):
    """BD3-LM's [x_t ⊕ x_0] pass == running each block with clean prefix, same masks."""
    x0, answer = make_batch(B=2, L=14, prompt=2, seed=4)
    order = build_order({"name": "block", "block_size": 4})
    layout = order.layout(answer)
    plan = order.train_plan(x0, layout, tiny_model.cfg.mask_id, torch.Generator().manual_seed(5))
    with torch.no_grad():
        vec = plan_logits(tiny_model, plan)
        zt = plan.tokens[:, :14]
        loop = torch.zeros_like(vec)
        for b in range(int(layout.n_blocks.max())):
            keep = (layout.block[0] <= b)                      # prompt (-1) + blocks <= b: a prefix here
            Lb = int(keep.sum())
            inp = torch.where(layout.block == b, zt, x0)[:, :Lb]
            sub = order.layout(answer[:, :Lb])
            logits = tiny_model(inp, attn_mask=masks.block_causal(sub))
            sel = layout.block[:, :Lb] == b
            loop[:, :Lb][sel] = logits[sel]
    sc = plan.scored
    assert sc.any()
    torch.testing.assert_close(vec[sc], loop[sc], rtol=1e-4, atol=1e-4)
    # and the loss computed from the loop's logits equals the vectorised loss
    lp = torch.log_softmax(loop, -1).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    loss_loop = float((plan.elbo_weight * -lp * sc).sum() / answer.sum())
    loss_vec, _ = plan_loss(tiny_model, plan)
    assert abs(loss_loop - float(loss_vec.detach())) < 1e-4


def test_jigsaw_teacher_forced_matches_left_to_right_inference(tiny_model):
    """Faithful Jigsaw: token k of a masked block scores exactly as at inference with clean <k."""
    x0, answer = make_batch(B=1, L=11, prompt=3, seed=6)
    order = build_order({"name": "jigsaw", "block_size": 4})
    layout = order.layout(answer)
    mask_id = tiny_model.cfg.mask_id
    for seed in range(4):
        plan = order.train_plan(x0, layout, mask_id, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            vec = plan_logits(tiny_model, plan)
        blk_masked = plan.scored
        for i in blk_masked[0].nonzero().view(-1).tolist():
            # inference state: masked blocks masked, except tokens of i's block left of i are clean
            same = layout.block[0] == layout.block[0, i]
            state_masked = blk_masked[0] & ~(same & (layout.aidx[0] < layout.aidx[0, i]))
            inp = torch.where(state_masked, torch.full_like(x0[0], mask_id), x0[0]).unsqueeze(0)
            visible = answer & ~blk_masked
            with torch.no_grad():
                ref = tiny_model(inp, attn_mask=masks.jigsaw(layout, visible))
            torch.testing.assert_close(vec[0, i], ref[0, i], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["random", "ar", "block", "prefix_block", "jigsaw", "scatter"])
def test_every_order_trains_a_step(tiny_model, name):
    x0, answer = make_batch(B=4, L=12, prompt=3, seed=7)
    order = build_order(name)
    plan = order.train_plan(x0, order.layout(answer), tiny_model.cfg.mask_id, torch.Generator().manual_seed(0))
    tiny_model.train()
    loss, stats = plan_loss(tiny_model, plan, weighting=order.default_weighting)
    loss.backward()
    assert torch.isfinite(loss) and float(loss) > 0
    assert all(p.grad is not None for p in tiny_model.blocks[0].parameters())
    assert not plan.scored[~answer].any()  # prompt never scored


@pytest.mark.parametrize("weighting", ["elbo", "clamp", "uniform", "focal"])
def test_weightings(tiny_model, weighting):
    x0, answer = make_batch(B=4, L=10, prompt=2, seed=8)
    order = build_order("random")
    plan = order.train_plan(x0, order.layout(answer), tiny_model.cfg.mask_id, torch.Generator().manual_seed(0))
    loss, _ = plan_loss(tiny_model, plan, weighting=weighting)
    assert torch.isfinite(loss) and float(loss) > 0


def test_unknown_weighting_lists_choices(tiny_model):
    x0, answer = make_batch()
    order = build_order("random")
    plan = order.train_plan(x0, order.layout(answer), tiny_model.cfg.mask_id, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="Did you mean 'elbo'.*Valid choices: clamp, elbo, focal, uniform"):
        plan_loss(tiny_model, plan, weighting="elb")


def test_eps_block_schedule_windows():
    s = EpsBlock(eps=0.0, block_size=2)
    aidx = torch.arange(6).unsqueeze(0)
    n = torch.tensor([6])
    alpha, rate = s.alpha_and_rate(torch.tensor([0.5]), aidx, n)   # 3 blocks; t=0.5 is inside block 1's window
    assert alpha[0].tolist() == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.0, 0.0])
    assert rate[0].tolist() == [0.0, 0.0, 3.0, 3.0, 0.0, 0.0]
