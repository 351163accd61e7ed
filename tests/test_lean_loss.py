"""The lean training loss (head + log-softmax on the scored rows only) equals today's full-logits loss.

The reference below is the loss as it was computed before: the model's logits at every query
row, an fp32 log-softmax over all of them, the scored rows picked afterwards. The loss value
and the gradients must agree within float rounding: row by row it is the same arithmetic, but the
last block's projection and MLP and the head run as matrix products over fewer rows, which a BLAS
may round differently, and weight gradients sum over fewer rows.
"""
import pytest
import torch
import torch.nn.functional as F

from anyorder.model import ModelConfig, Transformer
from anyorder.model.transformer import ROW_MULTIPLE, pad_rows
from anyorder.objectives.nelbo import WEIGHTINGS, plan_logits, plan_loss, token_weights
from anyorder.objectives.rows import expand_extra, is_argmax, scored_target_logp
from anyorder.orders import build_order
from anyorder.studies.toy import all_pattern_batch, merged_targets
from anyorder.tasks.toy import ToyTask

from conftest import make_batch

ORDERS = [{"name": "random"}, {"name": "random", "schedule": "cosine"}, {"name": "ar"},
          {"name": "block", "block_size": 4}, {"name": "prefix_block", "block_size": 4},
          {"name": "jigsaw", "block_size": 4}, {"name": "jigsaw", "block_size": 4, "teacher_forced": False},
          {"name": "scatter", "block_size": 4}]


def full_logits_loss(model, plan, extra=None, weighting="elbo"):
    """Today's plan_loss, re-computed plainly: full logits, then select."""
    logits = plan_logits(model, plan, extra)
    logp = F.log_softmax(logits.float(), dim=-1)
    logp_t = logp.gather(-1, plan.targets.unsqueeze(-1)).squeeze(-1)
    w = token_weights(weighting, plan, logp_t)
    n_tok = (plan.answer.sum() if plan.answer is not None else plan.targets.numel()).clamp_min(1)
    ce = torch.where(plan.scored, -logp_t, torch.zeros_like(logp_t))
    loss = (w * ce).sum() / n_tok
    with torch.no_grad():
        n_scored = plan.scored.sum().clamp_min(1)
        acc = ((logits.argmax(-1) == plan.targets) & plan.scored).sum() / n_scored
        return loss, {"masked_ce": float(ce.sum() / n_scored), "masked_acc": float(acc)}


def padded(n):
    """The row count the row-wise work runs on: ``n`` rounded up to a multiple of ROW_MULTIPLE."""
    return -(-n // ROW_MULTIPLE) * ROW_MULTIPLE


def _model(time_conditioning=False, vocab=11):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, mask_id=vocab - 1, d_model=32, n_layers=2, n_heads=2, max_len=64,
                      extra_embeddings={"row": 4}, time_conditioning=time_conditioning)
    model = Transformer(cfg)
    with torch.no_grad():  # peaked predictions, so the accuracy statistic is not trivially 0
        model.head.weight.mul_(20.0)
    return model


def _close(a, b, name):
    """Equal within float32 rounding of sums: 1e-5 relative, or 1e-6 of the tensor's largest entry."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()) + 1e-9, msg=name)


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("spec", ORDERS, ids=lambda s: "-".join(str(v) for v in s.values()))
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_lean_loss_equals_full_logits_loss(spec, weighting):
    model = _model(time_conditioning=spec.get("schedule") == "cosine")
    x0, answer = make_batch(B=6, L=16, prompt=4, vocab=10, seed=1)
    extra = {"row": torch.arange(16) % 4}
    order = build_order(dict(spec))
    for seed in range(3):  # fixed batches: three draws of masks and times
        plan = order.train_plan(x0, order.layout(answer), model.cfg.mask_id, torch.Generator().manual_seed(seed))
        new, stats = plan_loss(model, plan, extra=extra, weighting=weighting)
        old, old_stats = full_logits_loss(model, plan, extra=extra, weighting=weighting)
        _close(new.detach(), old.detach(), "loss")
        assert stats["masked_ce"] == pytest.approx(old_stats["masked_ce"], rel=1e-6)
        assert stats["masked_acc"] == old_stats["masked_acc"]
        g_new, g_old = _grads(model, new), _grads(model, old)
        assert g_new.keys() == g_old.keys()
        for name in g_old:
            _close(g_new[name], g_old[name], name)


def test_the_accuracy_statistic_is_not_trivial():
    model = _model()
    x0, answer = make_batch(B=6, L=16, prompt=4, vocab=10, seed=1)
    order = build_order("random")
    accs = [plan_loss(model, order.train_plan(x0, order.layout(answer), 10, torch.Generator().manual_seed(s)),
                      extra={"row": torch.arange(16) % 4})[1]["masked_acc"] for s in range(4)]
    assert any(a > 0 for a in accs), accs


def test_chunked_rows_give_the_same_loss_and_gradients():
    """Chunks of 3 rows (recomputed in backward) against one chunk: the same log-probabilities and
    gradients within float rounding (a 3-row matmul may take another kernel path than a 22-row one)."""
    model = _model()
    x0, answer = make_batch(B=4, L=16, prompt=4, vocab=10, seed=2)
    order = build_order({"name": "block", "block_size": 4})
    plan = order.train_plan(x0, order.layout(answer), 10, torch.Generator().manual_seed(0))
    one, n1 = scored_target_logp(model, plan, chunk_logits=1 << 30)
    many, n2 = scored_target_logp(model, plan, chunk_logits=3 * model.cfg.vocab_size)
    assert int(plan.scored.sum()) > 9 and int(n1) == int(n2)
    torch.testing.assert_close(many, one, rtol=1e-6, atol=1e-7)
    g1, g2 = _grads(model, -one.sum()), _grads(model, -many.sum())
    for name in g1:
        _close(g2[name], g1[name], name)


@pytest.mark.parametrize("spec", [{"name": "random"}, {"name": "block", "block_size": 4}, {"name": "ar"}])
def test_the_head_sees_only_scored_rows(spec):
    """The two-stream passes (block, AR) do not apply the head to the clean half, nor to unmasked rows."""
    model = _model()
    seen = []
    model.head.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    x0, answer = make_batch(B=4, L=16, prompt=4, vocab=10, seed=3)
    order = build_order(spec)
    plan = order.train_plan(x0, order.layout(answer), 10, torch.Generator().manual_seed(0))
    assert plan.tokens.shape[1] == (32 if spec["name"] != "random" else 16)
    plan_loss(model, plan)
    n = int(plan.scored.sum())
    assert seen == [n] and n < 4 * 16


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "gradient-checkpointing"])
@pytest.mark.parametrize("spec", [{"name": "random"}, {"name": "block", "block_size": 4},
                                  {"name": "jigsaw", "block_size": 4}])
def test_hidden_rows_equals_the_full_pass_at_those_rows(spec, recompute):
    """``hidden_rows`` (the last block's projection and MLP on the asked rows only) gives ``hidden``
    at those rows, and its gradients, within float rounding; its last MLP sees only those rows."""
    model = _model()
    model.set_gradient_checkpointing(recompute)
    x0, answer = make_batch(B=4, L=16, prompt=4, vocab=10, seed=5)
    order = build_order(spec)
    plan = order.train_plan(x0, order.layout(answer), 10, torch.Generator().manual_seed(1))
    kw = dict(attn_mask=plan.attn, positions=plan.index, extra=expand_extra({"row": torch.arange(16) % 4}, plan.index))
    rows = torch.zeros(plan.tokens.shape, dtype=torch.bool)
    rows[:, :16] = plan.scored
    seen = []
    hook = model.blocks[-1].mlp.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    part = model.hidden_rows(plan.tokens, rows, **kw)
    hook.remove()
    full = model.hidden(plan.tokens, **kw)[rows]
    assert len(part) == int(plan.scored.sum()) > 9
    _close(part, full, "hidden")  # the same arithmetic row by row; a matmul over fewer rows may round differently
    assert seen[0] == len(part)  # the rows, not [B, L'] (recomputation may call it again)
    weight = torch.randn(part.shape)
    g_part, g_full = _grads(model, (part * weight).sum()), _grads(model, (full * weight).sum())
    assert g_part.keys() == g_full.keys()
    for name in g_full:
        _close(g_part[name], g_full[name], name)


def test_cpu_autocast_pads_the_row_wise_work_to_a_few_shapes(monkeypatch):
    """Under CPU bf16 autocast the last block's MLP and the head run on the scored rows padded with
    zero rows to a multiple of ROW_MULTIPLE (oneDNN builds a kernel per shape); the loss is the
    unpadded one's within bf16 rounding. In fp32 nothing is padded (test above)."""
    import anyorder.model.transformer as native

    model = _model()
    x0, answer = make_batch(B=4, L=16, prompt=4, vocab=10, seed=3)
    order = build_order("random")
    plan = order.train_plan(x0, order.layout(answer), 10, torch.Generator().manual_seed(0))
    n = int(plan.scored.sum())
    seen = []
    model.head.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    model.blocks[-1].mlp.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        padded_loss, stats = plan_loss(model, plan)
    assert seen == [padded(n), padded(n)] and padded(n) > n
    monkeypatch.setattr(native, "ROW_MULTIPLE", 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_loss, plain_stats = plan_loss(model, plan)
    assert seen[2:] == [n, n]
    assert float(padded_loss) == pytest.approx(float(plain_loss), rel=2e-2)
    assert stats["masked_frac"] == plain_stats["masked_frac"]


def test_models_without_a_separate_head_fall_back_to_full_logits():
    """An adapter exposing only ``forward`` gets the full pass, then the scored rows: the same loss."""
    model = _model()

    class ForwardOnly(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *a, **kw):
            return self.inner(*a, **kw)

    x0, answer = make_batch(B=4, L=16, prompt=4, vocab=10, seed=4)
    order = build_order({"name": "jigsaw", "block_size": 4})
    plan = order.train_plan(x0, order.layout(answer), 10, torch.Generator().manual_seed(0))
    a, sa = plan_loss(model, plan)
    b, sb = plan_loss(ForwardOnly(model), plan)
    assert torch.equal(a.detach(), b.detach()) and sa == sb


def test_pad_rows_appends_zero_rows_to_a_multiple():
    t = torch.randn(70, 3)
    p = pad_rows(t, 64)
    assert p.shape == (128, 3) and torch.equal(p[:70], t) and not p[70:].any()
    assert pad_rows(p, 64) is p and pad_rows(t[:64], 64).shape == (64, 3)
    assert pad_rows(t) is t  # fp32 outside autocast: no padding
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pad_rows(t).shape == (128, 3)


def test_is_argmax_matches_argmax_with_ties():
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 4, (200, 7), generator=g).float()  # many ties
    logits[:, 6] = float("-inf")
    targets = torch.randint(0, 6, (200,), generator=g)
    assert torch.equal(is_argmax(logits, targets), logits.argmax(-1) == targets)
    assert int((logits.argmax(-1) == targets).sum()) > 10


def test_toy_merged_inputs_give_the_same_loss_and_gradients():
    """The toy trains on its 1536 distinct inputs with summed target weights: the loss of all
    3100 (sequence, pattern) rows, within float rounding."""
    task = ToyTask()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=task.vocab_size, mask_id=task.mask_id, d_model=32, n_layers=2,
                                    n_heads=4, max_len=8))
    z, x, masked, weight = all_pattern_batch(task.data, task.mask_id)
    logp = F.log_softmax(model(z), -1).gather(-1, x.unsqueeze(-1)).squeeze(-1)
    old = (weight * torch.where(masked, -logp, 0.0).sum(-1)).sum()
    inputs, rows, keys, w = merged_targets(z, x, masked, weight, task.vocab_size)
    assert len(inputs) == 1536 and len(z) == 3100
    h = model.hidden(inputs).reshape(-1, 32)[rows]
    new = -(w * F.log_softmax(model.head_logits(h), -1).view(-1)[keys]).sum()
    torch.testing.assert_close(new, old, rtol=1e-6, atol=0)
    g_new, g_old = _grads(model, new), _grads(model, old)
    for name in g_old:
        _close(g_new[name], g_old[name], name)
