"""The decoding lab's decoders: each rule on a hand-built fake model whose logits we control,
batched == row-by-row on a tiny transformer, and clear errors for bad options."""
import argparse
import math
from types import SimpleNamespace

import pytest
import torch

from anyorder.decoding import DECODERS, build_decoder
from anyorder.decoding.threshold import threshold_commit
from anyorder.orders import build_order
from anyorder.tasks.toy import A, A_, B, B_, C, D, COUNTS

from conftest import assert_batched_equals_row_by_row, make_batch


class FakeModel(torch.nn.Module):
    """``fn(tokens) -> probabilities [B, L, V]``; the model returns their logs (mask column
    -inf, as the Transformer does) and records every input it saw."""

    def __init__(self, vocab, mask_id, fn):
        super().__init__()
        self.cfg = SimpleNamespace(mask_id=mask_id, vocab_size=vocab)
        self.fn, self.inputs = fn, []

    def forward(self, tokens, attn_mask=None, positions=None, extra=None, t=None):
        self.inputs.append(tokens.clone())
        logits = torch.log(self.fn(tokens).double()).float()
        logits[..., self.cfg.mask_id] = float("-inf")
        return logits


def peaked(tokens, top, conf, vocab=11, mask_id=10):
    """Position i puts ``conf[i]`` on ``top[i]`` and spreads the rest over the other real tokens."""
    Bn, L = tokens.shape
    p = torch.zeros(Bn, L, vocab, dtype=torch.float64)
    conf = torch.as_tensor(conf, dtype=torch.float64).expand(Bn, L)
    top = torch.as_tensor(top).expand(Bn, L)
    p[..., :mask_id] = ((1 - conf) / (mask_id - 1)).unsqueeze(-1)
    p.scatter_(-1, top.unsqueeze(-1), conf.unsqueeze(-1))
    return p


def masked_row(L, mask_id=10, B=1):
    return torch.full((B, L), mask_id), torch.ones(B, L, dtype=torch.bool)


# ---- threshold ---------------------------------------------------------------------------
def test_threshold_commits_exactly_the_tokens_above_tau():
    conf = [0.95, 0.30, 0.92, 0.50, 0.91, 0.20]
    model = FakeModel(11, 10, lambda t: peaked(t, [1, 2, 3, 4, 5, 6], conf))
    x, answer = masked_row(6)
    r = build_decoder({"name": "threshold", "tau": 0.9}).decode(model, build_order("random"), x, answer)
    # step 0: the three above 0.9; then none is above, so one per step, most confident first
    assert r.trace.finalize_step[0].tolist() == [0, 2, 0, 1, 0, 3]
    assert r.tokens[0].tolist() == [1, 2, 3, 4, 5, 6]
    assert r.trace.nfe.tolist() == [4] and r.trace.afp().tolist() == [1.5]
    assert torch.allclose(r.trace.confidence[0], torch.tensor(conf, dtype=torch.float64), atol=1e-6)
    r = build_decoder({"name": "threshold", "tau": 0.25}).decode(model, build_order("random"), x, answer)
    assert r.trace.finalize_step[0].tolist() == [0, 0, 0, 0, 0, 1]


def test_threshold_rule_equality_passes_and_cap():
    conf = torch.tensor([[0.9, 0.5, 0.95, 0.1]], dtype=torch.float64)
    allowed = torch.tensor([[True, True, True, False]])
    assert threshold_commit(conf, allowed, 0.9).tolist() == [[True, False, True, False]]
    assert threshold_commit(conf, allowed, 0.99).tolist() == [[False, False, True, False]]   # at least one
    assert threshold_commit(conf, allowed, 0.5, max_per_step=2).tolist() == [[True, False, True, False]]


# ---- ancestral ---------------------------------------------------------------------------
def test_ancestral_skip_cache_reduces_nfe_and_changes_nothing_else():
    model = FakeModel(11, 10, lambda t: peaked(t, [1, 2, 3, 4, 5, 6], 0.8))
    x, answer = masked_row(6, B=3)
    order = build_order("random")
    skip = build_decoder({"name": "ancestral", "steps": 40}).decode(model, order, x, answer, row_seeds=[0, 1, 2])
    calls = len(model.inputs)
    full = build_decoder({"name": "ancestral", "steps": 40, "skip_unchanged": False}).decode(
        model, order, x, answer, row_seeds=[0, 1, 2])
    assert torch.equal(skip.tokens, full.tokens) and torch.equal(skip.trace.finalize_step, full.trace.finalize_step)
    # a forward pass only on the first step and after a step that changed the row
    n_changes = torch.tensor([len(torch.unique(f)) for f in skip.trace.finalize_step])
    assert skip.trace.nfe.tolist() == n_changes.tolist()
    assert full.trace.nfe.tolist() == (skip.trace.finalize_step.max(-1).values + 1).tolist()
    assert (skip.trace.nfe < full.trace.nfe).all() and int(skip.trace.finalize_step.max()) == 39
    assert calls < 40                                   # whole forward calls were skipped too


def test_ancestral_unmasks_with_probability_one_over_remaining_steps():
    model = FakeModel(11, 10, lambda t: peaked(t, 1, 0.8))
    B, L, T = 3000, 6, 5
    x, answer = masked_row(L, B=B)
    r = build_decoder({"name": "ancestral", "steps": T}).decode(model, build_order("random"), x, answer,
                                                                row_seeds=list(range(B)))
    f = r.trace.finalize_step
    assert int(f.max()) == T - 1                          # the last grid step unmasks the rest
    for i in range(T - 1):                                # P(unmask at step i | still masked) = 1/(T - i)
        still = (f >= i).sum().item()
        frac = (f == i).sum().item() / still
        assert abs(frac - 1 / (T - i)) < 4 * math.sqrt((1 / (T - i)) * (1 - 1 / (T - i)) / still)


def test_ancestral_respects_the_order():
    model = FakeModel(11, 10, lambda t: peaked(t, 1, 0.8))
    x, answer = masked_row(8, B=2)
    r = build_decoder({"name": "ancestral", "steps": 4}).decode(model, build_order("ar"), x, answer)
    assert r.trace.kendall_tau().tolist() == [1.0, 1.0]   # AR allows only the leftmost hole


# ---- remask ------------------------------------------------------------------------------
def _remask_model():
    def fn(t):
        m = t == 10
        top = torch.tensor([1, 5, 6, 7, 8]).expand_as(t).clone()
        conf = torch.tensor([0.6, 0.9, 0.5, 0.4, 0.3], dtype=torch.float64).expand(t.shape).clone()
        late = ~m[:, 3]                                    # once position 3 is visible, position 0 is a 2
        top[late, 0], conf[late, 0] = 2, 0.99
        return peaked(t, top, conf)
    return FakeModel(11, 10, fn)


def test_remask_changes_a_committed_token():
    model = _remask_model()
    x, answer = masked_row(5)
    plain = build_decoder({"name": "top_prob", "k": 2}).decode(model, build_order("random"), x, answer)
    assert plain.tokens[0, 0] == 1                         # committed at step 0 with 0.6, never revisited
    dec = build_decoder({"name": "remask", "k": 2, "n_remask": 1, "remask_until": 1.0})
    r = dec.decode(model, build_order("random"), x, answer)
    # step 0 commits positions 0 (0.6) and 1 (0.9); step 1 commits 2, 3 and re-masks the least
    # confident earlier commit, position 0; step 2 decodes it again, now seeing position 3
    assert r.tokens[0].tolist() == [2, 5, 6, 7, 8]
    assert r.trace.finalize_step[0].tolist() == [2, 0, 1, 1, 2]
    assert abs(float(r.trace.confidence[0, 0]) - 0.99) < 1e-6
    assert dec.last_info["remasked"].tolist() == [1] and r.trace.nfe.tolist() == [3]


def test_remask_terminates_when_only_one_position_is_allowed(tiny_model):
    x0, answer = make_batch(B=2, L=12, prompt=3)
    x = torch.where(answer, torch.full_like(x0, 8), x0)
    r = build_decoder({"name": "remask", "k": 3, "n_remask": 2}).decode(tiny_model, build_order("ar"), x, answer)
    assert (r.tokens[answer] != 8).all() and r.trace.nfe.tolist() == [9, 9]   # AR: one per step, no re-masks


# ---- edit --------------------------------------------------------------------------------
def planted_wrong_token():
    """(truth, model, x, answer): a model sure of ``truth``; a prompt of 4 true tokens and one
    wrong answer token (position 6) given in the input, the rest masked."""
    truth = torch.arange(12) % 9
    model = FakeModel(11, 10, lambda t: peaked(t, truth, 0.9))
    x = torch.full((1, 12), 10)
    answer = torch.ones(1, 12, dtype=torch.bool)
    answer[0, :4] = False
    x[0, :4] = truth[:4]
    x[0, 6] = (truth[6] + 1) % 9                            # a wrong answer token given in the input
    return truth, model, x, answer


def test_edit_fixes_a_planted_wrong_token():
    truth, model, x, answer = planted_wrong_token()
    order = build_order("random")
    plain = build_decoder({"name": "top_prob", "k": 4}).decode(model, order, x, answer)
    assert plain.tokens[0, 6] != truth[6]
    dec = build_decoder({"name": "edit", "k": 4})
    r = dec.decode(model, order, x, answer)
    assert torch.equal(r.tokens[0], truth)
    # NFE: draft 2 (7 masks, 4 per step) + 8 leave-one-out passes + 1 regeneration + 8 passes
    # of the second round, which flags nothing and stops
    assert r.trace.nfe.tolist() == [2 + 8 + 1 + 8]
    assert dec.last_info["flagged"].tolist() == [1] and dec.last_info["changed"].tolist() == [1]
    g = build_decoder({"name": "edit", "k": 4, "edit_groups": 2}).decode(model, order, x, answer)
    assert torch.equal(g.tokens[0], truth) and g.trace.nfe.tolist() == [2 + 2 + 1 + 2]


# ---- seed 004's toy: beam and edit find the joint mode -------------------------------------
M = 106


def toy_model():
    """Exact conditionals of the toy data given C D at positions 2, 3: position 0 from the
    counts given position 1 (or its marginal when masked), and vice versa; E uniform."""
    n = sum(COUNTS.values())

    def fn(t):
        p = torch.zeros(t.shape[0], t.shape[1], 107, dtype=torch.float64)
        for b in range(t.shape[0]):
            for i, (mine, other) in enumerate([((A, A_), (B, B_)), ((B, B_), (A, A_))]):
                o = int(t[b, 1 - i])
                for v in mine:
                    pair = lambda w: (v, w) if i == 0 else (w, v)
                    if o in other:
                        p[b, i, v] = COUNTS[pair(o)] / sum(COUNTS[(u, o) if i == 0 else (o, u)] for u in mine)
                    else:
                        p[b, i, v] = sum(COUNTS[pair(w)] for w in other) / n
            p[b, 2, C] = p[b, 3, D] = 1.0
            p[b, 4, 6:106] = 1.0 / 100
        return p
    return FakeModel(107, M, fn)


def _toy_prompt():
    return torch.tensor([[M, M, C, D, M]]), torch.tensor([[True, True, False, False, True]])


def test_beam_commits_the_joint_mode_on_the_toy():
    model = toy_model()
    x, answer = _toy_prompt()
    order = build_order("random")
    plain = build_decoder({"name": "top_prob", "k": 2}).decode(model, order, x, answer)
    assert plain.tokens[0, :2].tolist() == [A, B]           # product of marginals: 0.55 * 0.69
    r = build_decoder({"name": "beam", "k": 2}).decode(model, order, x, answer)
    assert r.tokens[0, :2].tolist() == [A_, B]              # joint mode, 0.35 > 0.34
    assert r.trace.finalize_step[0].tolist() == [0, 0, -1, -1, 1]
    # B first (0.69), then A' given B: 35/69; NFE = 1 + one pass per live hypothesis (B, B') + 1
    assert abs(float(r.trace.confidence[0, 0]) - 35 / 69) < 1e-6
    assert r.trace.nfe.tolist() == [4]


def test_edit_repairs_the_parallel_pick_on_the_toy():
    model = toy_model()
    x, answer = _toy_prompt()
    r = build_decoder({"name": "edit", "k": 2}).decode(model, build_order("random"), x, answer)
    assert r.tokens[0, :2].tolist() == [A_, B]              # P(A | B) = 34/69 < P(A' | B): A re-masked


# ---- jigsaw_entropy ----------------------------------------------------------------------
def _entropy_model():
    # prompt of 2, then 3 blocks of 4: block 1 sharp, block 2 medium, block 0 flat
    conf = torch.tensor([0.5] * 2 + [0.15] * 4 + [0.99] * 4 + [0.6] * 4, dtype=torch.float64)
    return FakeModel(11, 10, lambda t: peaked(t, 3, conf))


@pytest.mark.parametrize("order,opts", [({"name": "jigsaw", "block_size": 4}, {}),
                                        ("random", {"blocks": 4})])
def test_jigsaw_entropy_picks_the_lowest_entropy_block(order, opts):
    model = _entropy_model()
    x = torch.full((1, 14), 10)
    x[0, :2] = 1
    answer = torch.ones(1, 14, dtype=torch.bool)
    answer[0, :2] = False
    r = build_decoder({"name": "jigsaw_entropy", **opts}).decode(model, build_order(order), x, answer)
    f = r.trace.finalize_step[0, 2:].view(3, 4)
    assert f.tolist() == [[8, 9, 10, 11], [0, 1, 2, 3], [4, 5, 6, 7]]   # block 1, 2, 0; left to right


# ---- scatter_offsets ---------------------------------------------------------------------
@pytest.mark.parametrize("order", [{"name": "scatter", "block_size": 4}, "random"])
def test_scatter_offsets_decodes_column_by_column(tiny_model, order):
    x0, answer = make_batch(B=2, L=16, prompt=4)            # 12 answer tokens = 3 blocks x 4 offsets
    x = torch.where(answer, torch.full_like(x0, 8), x0)
    for spo, nfe in [(1, 4), (2, 8)]:
        r = build_decoder({"name": "scatter_offsets", "steps_per_offset": spo, "stride": 4}).decode(
            tiny_model, build_order(order), x, answer)
        cols = r.trace.finalize_step[0][answer[0]].view(3, 4)
        assert all(cols[:, c].max() < cols[:, c + 1].min() for c in range(3))
        assert r.trace.nfe.tolist() == [nfe, nfe]


# ---- random_init -------------------------------------------------------------------------
def test_random_init_fills_a_fraction_and_remasks_it():
    model = FakeModel(11, 10, lambda t: peaked(t, torch.arange(8) % 9, 0.8))
    x, answer = masked_row(8)
    r = build_decoder({"name": "random_init", "ratio": 0.5, "fill_tokens": [1, 2, 3]}).decode(
        model, build_order("random"), x, answer)
    assert r.tokens[0].tolist() == (torch.arange(8) % 9).tolist()   # the fills never reach the output
    seen = [inp[0] for inp in model.inputs]
    n_masked = 8
    for i, inp in enumerate(seen):
        committed_now = r.trace.finalize_step[0] < i
        fills = (inp != 10) & ~committed_now
        assert int(fills.sum()) == min(int(0.5 * n_masked), n_masked - 1)
        assert set(inp[fills].tolist()) <= {1, 2, 3}
        n_masked -= 1
    assert r.trace.nfe.tolist() == [8]


def test_random_init_with_ratio_zero_is_the_score_decoder(tiny_model):
    x0, answer = make_batch(B=3, L=12, prompt=3)
    x = torch.where(answer, torch.full_like(x0, 8), x0)
    a = build_decoder({"name": "random_init", "ratio": 0.0, "k": 2, "temperature": 1.0}).decode(
        tiny_model, build_order("random"), x, answer)
    b = build_decoder({"name": "top_prob", "k": 2, "temperature": 1.0}).decode(tiny_model, build_order("random"), x, answer)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.trace.finalize_step, b.trace.finalize_step)


# ---- batched == row by row ---------------------------------------------------------------
CASES = [("random", {"name": "threshold", "tau": 0.3, "temperature": 1.0}),
         ("block", {"name": "threshold", "tau": 0.2, "window": 4}),
         ("random", {"name": "ancestral", "steps": 6, "temperature": 1.0}),
         ("block", {"name": "ancestral", "temperature": 0.8, "top_p": 0.9}),
         ("random", {"name": "remask", "k": 3, "n_remask": 2, "temperature": 1.0}),
         ("random", {"name": "edit", "k": 4, "temperature": 1.0, "edit_groups": 3, "rounds": 2}),
         ("block", {"name": "edit", "tau": 0.3, "rounds": 1, "edit_groups": 2}),
         ("random", {"name": "random_init", "ratio": 0.4, "temperature": 1.0, "k": 2}),
         ("random", {"name": "beam", "k": 3, "width": 2}),
         ("jigsaw", {"name": "jigsaw_entropy", "temperature": 1.0}),
         ("scatter", {"name": "scatter_offsets", "temperature": 1.0})]


@pytest.mark.parametrize("order_name,spec", CASES, ids=[f"{o}-{s['name']}" for o, s in CASES])
def test_batched_equals_row_by_row(tiny_model, order_name, spec):
    x0, answer = make_batch(B=3, L=10, prompt=3)
    answer[1, 3] = False                                     # row 1 has a longer prompt
    x = torch.where(answer, torch.full_like(x0, 8), x0)
    order = build_order(order_name)
    full = assert_batched_equals_row_by_row(
        lambda xx, aa, s: build_decoder(dict(spec)).decode(tiny_model, order, xx, aa, row_seeds=s),
        x, answer, [5, 6, 7], check_nfe=True)
    assert not (full.tokens[answer] == 8).any()


# ---- errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,msg", [
    ({"name": "threshold", "tau": 0.0}, r"decoder.tau must be in \(0.0, 1.0\]"),
    ({"name": "threshold", "tau": 1.5}, r"decoder.tau must be in \(0.0, 1.0\]"),
    ({"name": "threshold", "k": 2}, "drop decoder.k"),
    ({"name": "ancestral", "k": 2}, "give decoder.steps, not decoder.k"),
    ({"name": "remask", "k": 2, "n_remask": 2}, r"decoder.n_remask must be in \[0, 1\]"),
    ({"name": "remask", "remask_until": 2}, r"decoder.remask_until must be in \[0.0, 1.0\]"),
    ({"name": "edit", "rounds": -1}, r"decoder.rounds must be in \[0, inf\]"),
    ({"name": "edit", "edit_tau": 1.2}, r"decoder.edit_tau must be in \[0.0, 1.0\]"),
    ({"name": "edit", "tau": 0.9, "k": 2}, "either tau"),
    ({"name": "random_init", "ratio": 1.0}, r"decoder.ratio must be in \[0.0, 1.0\)"),
    ({"name": "beam", "temperature": 1.0}, "temperature must be 0"),
    ({"name": "beam", "width": 0}, r"decoder.width must be in \[1, inf\]"),
    ({"name": "scatter_offsets", "steps_per_offset": 0}, r"decoder.steps_per_offset must be in \[1, inf\]"),
    ({"name": "jigsaw_entropy", "window": 4}, "decoder.blocks"),
    ({"name": "threshold", "taus": 0.9}, "Valid options: .*max_per_step.*tau"),
])
def test_bad_options_name_the_valid_range(spec, msg):
    with pytest.raises(ValueError, match=msg):
        build_decoder(spec)


def test_bad_fill_tokens(tiny_model):
    x0, answer = make_batch(B=1, L=8, prompt=2)
    x = torch.where(answer, torch.full_like(x0, 8), x0)
    with pytest.raises(ValueError, match="not tokens of this model"):
        build_decoder({"name": "random_init", "fill_tokens": [1, 8]}).decode(tiny_model, build_order("random"), x, answer)


def test_cli_passes_decoder_options():
    from anyorder.cli import _add_decoder_args, _decoder_spec

    p = argparse.ArgumentParser()
    _add_decoder_args(p)
    args = p.parse_args(["--decoder", "edit", "--k", "8", "--opt", "rounds=3", "--opt", "fill_tokens=[1, 2]",
                         "--opt", "edit_tau=0.9"])
    assert _decoder_spec(args) == {"name": "edit", "k": 8, "rounds": 3, "fill_tokens": [1, 2], "edit_tau": 0.9}
    with pytest.raises(ValueError, match="key=value"):
        _decoder_spec(p.parse_args(["--decoder", "edit", "--opt", "rounds"]))


def test_every_lab_decoder_is_registered():
    for name in ["threshold", "ancestral", "remask", "edit", "random_init", "beam", "jigsaw_entropy", "scatter_offsets"]:
        assert name in DECODERS
