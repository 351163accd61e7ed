"""Exact KV cache: cached decoding == uncached decoding, and the cache really skips work."""
import pytest
import torch

from anyorder.decoding import build_decoder
from anyorder.decoding.forward import CachedForward, cached_forward, uncached_forward
from anyorder.model import ModelConfig, Transformer
from anyorder.orders import build_order

from conftest import assert_batched_equals_row_by_row, make_batch

MASK = 8
ORDERS = ["ar", {"name": "block", "block_size": 1}, {"name": "block", "block_size": 4},
          {"name": "scatter", "block_size": 4}, {"name": "jigsaw", "block_size": 4},
          {"name": "prefix_block", "block_size": 4}, "random"]
DECODERS = [{"name": "top_prob"},                                                      # greedy
            {"name": "top_prob", "temperature": 1.0, "k": 2},                          # sampled
            {"name": "margin", "steps": 8, "window": 4, "temperature": 1.0}]       # semi-AR windows


def _ragged(B=4, L=18, prompt=3, seed=0):
    """Rows with different prompts and answer lengths (so they finish blocks at different steps)."""
    x0, answer = make_batch(B=B, L=L, prompt=prompt, seed=seed)
    answer[1, 3:5] = False          # longer prompt
    answer[2, -3:] = False          # shorter answer (trailing prompt-like context)
    answer[3, 3] = False
    answer[3, 9] = False            # a prompt token inside the answer
    return torch.where(answer, torch.full_like(x0, MASK), x0), answer


def _name(o):
    return o if isinstance(o, str) else f"{o['name']}{o['block_size']}"


@pytest.mark.parametrize("order_spec", ORDERS, ids=_name)
@pytest.mark.parametrize("dec", DECODERS, ids=["greedy", "sampled", "semi_ar"])
def test_cached_decode_equals_uncached(tiny_model, order_spec, dec):
    x, answer = _ragged()
    order = build_order(order_spec)
    seeds = [3, 5, 7, 9]
    ref = build_decoder(dict(dec)).decode(tiny_model, order, x, answer, row_seeds=seeds)
    cached = build_decoder(dict(dec, cache=True))
    # the cache machinery itself, for every order (``cache=True`` on random would pick the plain pass)
    cached.make_forward = lambda model, order, layout, extra=None: cached_forward(model, order, layout, extra)
    got = cached.decode(tiny_model, order, x, answer, row_seeds=seeds)
    assert torch.equal(got.tokens, ref.tokens)
    assert torch.equal(got.trace.finalize_step, ref.trace.finalize_step)
    assert torch.equal(got.trace.nfe, ref.trace.nfe)
    assert torch.allclose(got.trace.confidence, ref.trace.confidence, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("order_spec", ORDERS[:5], ids=_name)
def test_cached_batch_equals_row_by_row(tiny_model, order_spec):
    x, answer = _ragged()
    order = build_order(order_spec)
    dec = build_decoder({"name": "top_prob", "temperature": 1.0, "cache": True})
    assert_batched_equals_row_by_row(lambda xx, aa, s: dec.decode(tiny_model, order, xx, aa, row_seeds=s),
                                     x, answer, [11, 22, 33, 44])


def _steps(model, order, x, answer, k=1):
    """Drive both forwards side by side through a greedy decode; yield per step what to compare."""
    layout = order.layout(answer)
    cf, uf = cached_forward(model, order, layout), uncached_forward(model, order, layout)
    masked = answer & (x == MASK)
    while masked.any():
        lc, lu = cf(x, masked), uf(x, masked)
        allowed = order.allowed(masked, layout, torch.log_softmax(lu.double(), -1))
        yield cf, lc, lu, masked, layout
        # commit the k leftmost allowed positions with the uncached argmax
        rank = allowed.long().cumsum(-1)
        commit = allowed & (rank <= k)
        x = torch.where(commit, lu.argmax(-1), x)
        masked = masked & ~commit


@pytest.mark.parametrize("order_spec", ORDERS, ids=_name)
def test_logits_match_at_every_step(tiny_model, order_spec):
    x, answer = _ragged()
    order = build_order(order_spec)
    for cf, lc, lu, masked, layout in _steps(tiny_model, order, x, answer, k=2):
        live = order.live(masked, layout)
        live = torch.ones_like(masked) if live is None else live
        check = (live & masked.any(-1, keepdim=True)) | cf.cache.stored   # live + cached (frozen)
        assert torch.allclose(lc[check][:, :-1], lu[check][:, :-1], atol=1e-5), order.name
        assert cf.cache.stored.le(order.frozen(masked, layout)).all()      # only frozen entries kept


def test_first_call_is_a_full_exact_pass(tiny_model):
    x, answer = _ragged()
    order = build_order({"name": "block", "block_size": 4})
    masked = answer & (x == MASK)
    layout = order.layout(answer)
    lc = cached_forward(tiny_model, order, layout)(x, masked)
    lu = uncached_forward(tiny_model, order, layout)(x, masked)
    assert torch.allclose(lc[..., :-1], lu[..., :-1], atol=1e-5)


def test_cache_skips_work(tiny_model):
    """Exact query-token counts: after one full pass, AR runs the new hole and the token just
    committed; block diffusion runs the current block (plus the block that just finished)."""
    x0, answer = make_batch(B=1, L=15, prompt=3, seed=0)        # 12 answer tokens
    x = torch.where(answer, torch.full_like(x0, MASK), x0)
    L, n = 15, 12
    for spec, expected in [("ar", L + 2 * (n - 1)),
                           ({"name": "block", "block_size": 4}, L + 4 * (n - 1) + 4 * (3 - 1)),
                           ({"name": "scatter", "block_size": 4}, None),
                           ("random", L * n)]:
        order = build_order(spec)
        fwd = []
        dec = build_decoder({"name": "top_prob", "cache": True})
        dec.make_forward = lambda *a: fwd.append(cached_forward(*a)) or fwd[-1]
        dec.decode(tiny_model, order, x, answer)
        f: CachedForward = fwd[0]
        assert f.calls == n
        if expected is not None:
            assert f.query_tokens == expected, order.name
        else:  # scatter: every step after the first runs fewer than the full length
            assert f.query_tokens < L + (L - 3) * (n - 1)
    # the AR cache runs 2 query tokens per step instead of 15
    assert (L + 2 * (n - 1)) / n < 0.25 * L


def _trajectory(model, order, x, answer):
    """The states (masked sets) an uncached greedy decode went through, and its final tokens."""
    res = build_decoder({"name": "top_prob"}).decode(model, order, x, answer)
    fs = res.trace.finalize_step
    return [answer & (fs >= s) for s in range(int(fs.max()) + 1)], res.tokens


def _layer_states(model, x, attn):
    out = []
    hooks = [blk.register_forward_hook(lambda m, i, o: out.append(o)) for blk in model.blocks]
    try:
        with torch.no_grad():
            model(x, attn_mask=attn)
    finally:
        for h in hooks:
            h.remove()
    return out


@pytest.mark.parametrize("order_spec", ORDERS, ids=_name)
def test_frozen_positions_never_change(tiny_model, order_spec):
    """The contract behind the cache: what an order calls frozen at a state has, in every layer,
    the hidden state it has at the end of the decode."""
    x, answer = _ragged()
    order = build_order(order_spec)
    layout = order.layout(answer)
    states, tokens = _trajectory(tiny_model, order, x, answer)
    done = torch.zeros_like(answer)
    h_end = _layer_states(tiny_model, tokens, order.decode_attention(done, layout))
    n_frozen = 0
    for masked in states:
        frozen = order.frozen(masked, layout)
        n_frozen += int((frozen & layout.answer).sum())
        x_s = torch.where(masked, torch.full_like(tokens, MASK), tokens)
        for a, b in zip(_layer_states(tiny_model, x_s, order.decode_attention(masked, layout)), h_end):
            assert torch.allclose(a[frozen], b[frozen], atol=1e-5), order.name
    # ar, block and scatter freeze answer positions before the end; the others only the prompt
    assert (n_frozen > 0) == (order.name in ("ar", "block", "scatter"))


def test_jigsaw_finished_block_changes_when_another_finishes(tiny_model):
    """Why Jigsaw caches only the prompt: under SPEC §3's rule a finished block sees every
    finished block, so its states move when another block finishes."""
    x0, answer = make_batch(B=1, L=15, prompt=3, seed=4)       # 3 blocks of 4
    order = build_order({"name": "jigsaw", "block_size": 4})
    layout = order.layout(answer)
    only_b0 = answer & (layout.block != 0)                     # block 0 finished, 1 and 2 masked
    b0_b1 = answer & (layout.block == 2)                       # then block 1 finishes too
    xa = torch.where(only_b0, torch.full_like(x0, MASK), x0)
    xb = torch.where(b0_b1, torch.full_like(x0, MASK), x0)
    ha = _layer_states(tiny_model, xa, order.decode_attention(only_b0, layout))[-1]
    hb = _layer_states(tiny_model, xb, order.decode_attention(b0_b1, layout))[-1]
    b0 = layout.block == 0
    assert (ha[b0] - hb[b0]).abs().amax() > 1e-3
    assert torch.allclose(ha[layout.prompt], hb[layout.prompt])  # the prompt does not move


def test_remasked_token_invalidates_the_cache(tiny_model):
    """An editing decoder may put [MASK] back on a cached (frozen) token: the cache notices
    (token changed) and recomputes it and everything that saw it."""
    x0, answer = make_batch(B=1, L=15, prompt=3, seed=0)
    order = build_order("ar")
    layout = order.layout(answer)
    cf, uf = cached_forward(tiny_model, order, layout), uncached_forward(tiny_model, order, layout)
    masked = answer & (layout.aidx >= 6)                       # 6 answer tokens committed
    x = torch.where(masked, torch.full_like(x0, MASK), x0)
    cf(x, masked)
    masked2 = masked & (layout.aidx >= 7)
    x2 = torch.where(masked2, torch.full_like(x0, MASK), x0)
    cf(x2, masked2)                                            # aidx 0..5 now cached
    assert cf.cache.stored[0, 3:9].all()
    masked3 = masked2 | (layout.aidx == 2)                     # re-mask answer token 2
    x3 = torch.where(masked3, torch.full_like(x0, MASK), x0)
    lc, lu = cf(x3, masked3), uf(x3, masked3)
    assert not cf.cache.stored[0, 3 + 2:].any()                # token 2 and all after it dropped
    live = order.live(masked3, layout)
    assert torch.allclose(lc[live][:, :-1], lu[live][:, :-1], atol=1e-5)


def test_extra_embeddings_and_positions():
    """Task embeddings ([B, L] and [L] ids) are gathered at the query positions."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=9, mask_id=8, d_model=32, n_layers=2, n_heads=2, max_len=64,
                                    extra_embeddings={"row": 5, "col": 20})).eval()
    x, answer = _ragged()
    extra = {"row": torch.randint(0, 5, x.shape), "col": torch.arange(x.shape[1])}
    order = build_order({"name": "block", "block_size": 4})
    for dec in DECODERS[:2]:
        ref = build_decoder(dict(dec)).decode(model, order, x, answer, extra=extra)
        got = build_decoder(dict(dec, cache=True)).decode(model, order, x, answer, extra=extra)
        assert torch.equal(got.tokens, ref.tokens)
        assert torch.equal(got.trace.finalize_step, ref.trace.finalize_step)
