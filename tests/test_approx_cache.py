"""Approximate KV caches (prefix / dual / drift): exact where they must be, equal to a plain
reference that freezes K/V explicitly, validated options, and exact caches left alone."""
import pytest
import torch
import torch.nn.functional as F

from anyorder.bench_cache import RERUN, RerunForward, bench_cache_speed
from anyorder.decoding import build_decoder
from anyorder.decoding.approx_cache import ApproxCachedForward
from anyorder.decoding.forward import CachedForward
from anyorder.model import ModelConfig, Transformer
from anyorder.model.transformer import apply_rope, rope_tables
from anyorder.orders import build_order

from conftest import assert_batched_equals_row_by_row, make_batch

MASK = 8
BIG = torch.iinfo(torch.long).max
ORDERS = ["random", {"name": "prefix_block", "block_size": 4}, {"name": "jigsaw", "block_size": 4}]
MODES = [{"cache": "prefix"}, {"cache": "dual"}, {"cache": "drift", "cache_tol": 0.15}]


def _name(o):
    return o if isinstance(o, str) else f"{o['name']}{o['block_size']}"


@pytest.fixture(scope="module")
def sharp_model():
    """A tiny backbone with its weights scaled x4: sharp attention, so that stale K/V change
    tokens (with the plain init the approximations happen to give the exact tokens)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=9, mask_id=MASK, d_model=32, n_layers=2, n_heads=2, max_len=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model


def _ragged(B=4, L=18, prompt=3, seed=0):
    x0, answer = make_batch(B=B, L=L, prompt=prompt, seed=seed)
    answer[1, 3:5] = False          # longer prompt
    answer[2, -3:] = False          # trailing prompt-like context
    answer[3, 9] = False            # a prompt token inside the answer
    return torch.where(answer, torch.full_like(x0, MASK), x0), answer


def _decode(model, order, x, answer, spec, seeds=(3, 5, 7, 9), forwards=None):
    dec = build_decoder(dict(spec))
    if forwards is not None:  # keep the forward to read its counters
        make = dec.make_forward
        dec.make_forward = lambda *a: forwards.append(make(*a)) or forwards[-1]
    return dec.decode(model, order, x, answer, row_seeds=list(seeds))


# -- (a) exact when refreshed every step --------------------------------------------------------
@pytest.mark.parametrize("order_spec", ORDERS, ids=_name)
@pytest.mark.parametrize("cache", [{"cache": "prefix", "cache_every": 1}, {"cache": "dual", "cache_every": 1},
                                   {"cache": "drift", "cache_tol": 0}], ids=["prefix", "dual", "drift0"])
def test_refreshed_every_step_is_exact(sharp_model, order_spec, cache):
    """One window over the whole answer, refreshed every step (drift: tolerance 0): the tokens,
    trace and NFE of the uncached decode."""
    x, answer = _ragged()
    order = build_order(order_spec)
    for dec in ({"name": "top_prob"}, {"name": "margin", "k": 2, "temperature": 1.0}):
        ref = _decode(sharp_model, order, x, answer, dec)
        fwd = []
        got = _decode(sharp_model, order, x, answer, dict(dec, **cache), forwards=fwd)
        assert isinstance(fwd[0], ApproxCachedForward)
        assert torch.equal(got.tokens, ref.tokens)
        assert torch.equal(got.trace.finalize_step, ref.trace.finalize_step)
        assert torch.equal(got.trace.nfe, ref.trace.nfe)
        assert fwd[0].refreshes == int(ref.trace.nfe.sum())  # one refresh per row and step


def test_the_approximation_is_not_exact(sharp_model):
    """On this model the caches do change tokens (else the reference test below proves little)."""
    x, answer = _ragged()
    order = build_order("random")
    ref = _decode(sharp_model, order, x, answer, {"name": "top_prob", "window": 4})
    refreshes = {}
    for mode in MODES:
        fwd = []
        got = _decode(sharp_model, order, x, answer, dict({"name": "top_prob", "window": 4}, **mode), forwards=fwd)
        assert not torch.equal(got.tokens, ref.tokens), mode
        refreshes[mode["cache"]] = fwd[0].refreshes
    # dual refreshes once per row and window; drift also in between, but not every step
    assert refreshes["dual"] == refreshes["prefix"] == 4 + 4 + 3 + 4  # answers of 15, 13, 12, 14 tokens
    assert refreshes["dual"] < refreshes["drift"] < int(ref.trace.nfe.sum())


# -- (b) == a plain reference that freezes K/V explicitly ------------------------------------------
def _layers(model, x, attn, frozen=None, keep=None):
    """The whole row through the model, layer by layer; where ``keep`` [L] the K/V are replaced
    by the frozen ones. Returns logits [L, V] and the K/V used, per layer."""
    L, cfg = x.shape[1], model.cfg
    H, hd = cfg.n_heads, cfg.d_model // cfg.n_heads
    pos = torch.arange(L).unsqueeze(0)
    h = model.tok(x)
    cos, sin = (t.unsqueeze(1) for t in rope_tables(pos, hd, cfg.rope_base))
    kv = []
    for i, blk in enumerate(model.blocks):
        q, k, v = blk.attn.qkv(blk.norm1(h)).view(1, L, 3, H, hd).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if keep is not None:
            k = torch.where(keep.view(1, 1, L, 1), frozen[i][0], k)
            v = torch.where(keep.view(1, 1, L, 1), frozen[i][1], v)
        kv.append((k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn.view(1, 1, L, L))
        h = h + blk.attn.proj(y.transpose(1, 2).reshape(1, L, cfg.d_model))
        h = h + blk.mlp(blk.norm2(h))
    logits = model.head(model.norm(h)).float()[0]
    logits[:, cfg.mask_id] = float("-inf")
    return logits, kv


class NaiveFrozenKV:
    """The approximate caches as the papers describe them, one row at a time, full length: at a
    refresh (first call, new window, every ``every`` steps, or drift > tol) a plain full pass;
    otherwise every position runs, but those outside the recomputed set see and give the K/V
    frozen when they were last computed, and keep their logits."""

    def __init__(self, model, order, layout, window, mode, tol=None, every=None):
        self.model, self.order, self.layout, self.window = model, order, layout, window
        self.mode, self.tol, self.every = mode, tol, every
        self.rows = None

    def __call__(self, x, masked, rows=None, where=None):  # the loop's forward protocol: rows= -> those rows
        B, L = x.shape
        attn = self.order.decode_attention(masked, self.layout)
        attn = torch.ones(B, L, L, dtype=torch.bool) if attn is None else attn.expand(B, L, L)
        first = self.rows is None
        if first:
            self.rows = [{} for _ in range(B)]
        for b, r in enumerate(self.rows):
            self._row(r, x[b:b + 1], masked[b], attn[b], self.window[b], first)
        out = torch.stack([r["logits"] for r in self.rows])
        return out.clone() if rows is None else out[rows]

    def _row(self, r, x, masked, attn, window, first):
        win = int(window[masked].min()) if masked.any() else BIG
        if not first and not masked.any():
            return
        refresh = first or win != r["win"] or (self.every is not None and r["since"] >= self.every)
        in_win = window == win
        if self.mode == "prefix" and in_win.any():
            in_win = torch.arange(len(window)) >= int(in_win.nonzero()[0])
        run = in_win | (x[0] != r.get("tokens", x[0]))
        if not refresh:
            logits, kv = _layers(self.model, x, attn, r["kv"], ~run)
            r["logits"] = torch.where(run.unsqueeze(-1), logits, r["logits"])
            r["kv"], r["tokens"] = kv, torch.where(run, x[0], r["tokens"])
            if self.mode == "drift":
                same = run & (x[0] == r["snap_x"])
                num = sum(((n - s)[:, :, same] ** 2).sum() for now, snap in zip(kv, r["snap"])
                          for n, s in zip(now, snap))
                den = sum((s[:, :, same] ** 2).sum() for snap in r["snap"] for s in snap)
                refresh = not same.any() or float(num.double().sqrt() / den.double().sqrt()) > self.tol
        if refresh:
            r["logits"], r["kv"] = _layers(self.model, x, attn)
            r["tokens"], r["win"], r["since"] = x[0].clone(), win, 1
            r["snap"], r["snap_x"] = r["kv"], x[0].clone()
        else:
            r["since"] += 1


@pytest.mark.parametrize("order_spec", ORDERS, ids=_name)
@pytest.mark.parametrize("mode", MODES, ids=["prefix", "dual", "drift"])
@pytest.mark.parametrize("dec", [{"name": "top_prob", "window": 4},
                                 {"name": "margin", "k": 2, "window": 6, "temperature": 1.0},
                                 {"name": "top_prob", "window": 4, "cache_every": 2}],
                         ids=["greedy", "sampled", "every2"])
def test_equals_naive_frozen_kv(sharp_model, order_spec, mode, dec):
    if "cache_every" in dec and mode["cache"] == "drift":
        dec = {k: v for k, v in dec.items() if k != "cache_every"}
    x, answer = _ragged()
    order = build_order(order_spec)
    got = _decode(sharp_model, order, x, answer, dict(dec, **mode))
    ref_dec = build_decoder({k: v for k, v in dec.items() if k != "cache_every"})
    ref_dec.make_forward = lambda model, order, layout, extra=None: NaiveFrozenKV(
        model, order, layout, ref_dec.windows(layout), mode["cache"], mode.get("cache_tol"), dec.get("cache_every"))
    ref = ref_dec.decode(sharp_model, order, x, answer, row_seeds=[3, 5, 7, 9])
    assert torch.equal(got.tokens, ref.tokens)
    assert torch.equal(got.trace.finalize_step, ref.trace.finalize_step)


@pytest.mark.parametrize("order_spec", ORDERS, ids=_name)
@pytest.mark.parametrize("mode", MODES, ids=["prefix", "dual", "drift"])
def test_reading_every_logit_equals_naive_frozen_kv(sharp_model, order_spec, mode):
    """A decoder that reads the logits of every position (``needs_all_logits``) gets, from the
    kept hidden states and the lazily updated logits buffer, the logits of each position's last
    pass: the same tokens and steps as the reference that keeps logits after every pass."""
    cls = type("AllLogits", (type(build_decoder("top_prob")),), {"needs_all_logits": True})
    x, answer = _ragged()
    order = build_order(order_spec)
    got = cls(window=4, temperature=1.0, **mode).decode(sharp_model, order, x, answer, row_seeds=[3, 5, 7, 9])
    ref_dec = cls(window=4, temperature=1.0)
    ref_dec.make_forward = lambda model, order, layout, extra=None: NaiveFrozenKV(
        model, order, layout, ref_dec.windows(layout), mode["cache"], mode.get("cache_tol"), None)
    ref = ref_dec.decode(sharp_model, order, x, answer, row_seeds=[3, 5, 7, 9])
    assert torch.equal(got.tokens, ref.tokens)
    assert torch.equal(got.trace.finalize_step, ref.trace.finalize_step)


@pytest.mark.parametrize("order_spec, cache", [("random", "dual"), ("random", "prefix"),
                                               ({"name": "prefix_block", "block_size": 4}, True)],
                         ids=["dual", "prefix", "exact"])
def test_output_head_runs_only_where_read(tiny_model, order_spec, cache):
    """The cached forwards keep final hidden states and apply the output head only at the
    positions a step reads (the current window's holes: 4, 3, 2, 1 in each of the 3 windows, 30
    rows in all), not at every position a pass runs (dual: 3 x (15 + 3 x 4) = 81)."""
    x0, answer = make_batch(B=1, L=15, prompt=3, seed=0)
    x = torch.where(answer, torch.full_like(x0, MASK), x0)
    rows = []
    head = tiny_model.head_logits
    tiny_model.head_logits = lambda h: rows.append(h.shape[0]) or head(h)
    try:
        _decode(tiny_model, build_order(order_spec), x, answer, {"name": "top_prob", "window": 4, "cache": cache},
                seeds=[0])
    finally:
        del tiny_model.head_logits
    assert rows == [4, 3, 2, 1] * 3


@pytest.mark.parametrize("order_spec, kept", [("random", False), ({"name": "prefix_block", "block_size": 4}, True),
                                              ("ar", True), ({"name": "block", "block_size": 4}, True)],
                         ids=["random", "prefix_block", "ar", "block"])
def test_exact_cache_only_where_it_keeps_something(tiny_model, order_spec, kept):
    """``cache=True`` on ``random`` (its prompt attends to the answer: nothing is ever frozen and
    every position's logits may be read) would rerun every position every step and pay the
    book-keeping on top: it runs the plain pass. Orders that freeze positions keep the cache."""
    x0, answer = make_batch(B=1, L=15, prompt=3, seed=0)
    fwd = []
    _decode(tiny_model, build_order(order_spec), torch.where(answer, torch.full_like(x0, MASK), x0), answer,
            {"name": "top_prob", "cache": True}, seeds=[0], forwards=fwd)
    assert isinstance(fwd[0], CachedForward) == kept


@pytest.mark.parametrize("mode", MODES, ids=["prefix", "dual", "drift"])
def test_batched_equals_row_by_row(sharp_model, mode):
    x, answer = _ragged()
    order = build_order("random")
    dec = build_decoder(dict({"name": "top_prob", "window": 4, "temperature": 1.0}, **mode))
    assert_batched_equals_row_by_row(lambda xx, aa, s: dec.decode(sharp_model, order, xx, aa, row_seeds=s),
                                     x, answer, [11, 22, 33, 44], check_nfe=True)


def _staggered(L=15, prompt=3):
    """Two rows whose windows start at different steps (one token a step, windows of 4): row 1's
    first window has 2 holes (two answer tokens are given), so it refreshes at steps 2 and 6 and
    row 0 at steps 4 and 8."""
    x0, answer = make_batch(B=2, L=L, prompt=prompt, seed=0)
    x = torch.where(answer, torch.full_like(x0, MASK), x0)
    x[1, prompt:prompt + 2] = x0[1, prompt:prompt + 2]
    return x, answer


@pytest.mark.parametrize("mode", [{"cache": "dual"}, {"cache": "drift", "cache_tol": 0.15}], ids=["dual", "drift"])
def test_a_refresh_runs_only_the_rows_that_refresh(sharp_model, mode):
    """One batched pass pads every row to the largest query count: a row's refresh used to make
    every row of the batch run every position. Now the refreshing rows run apart; the batch
    still decodes exactly as its rows one by one."""
    x, answer = _staggered()
    B, L = x.shape
    passes = []
    hidden = sharp_model.hidden_cached

    def spy(tokens, *a, **kw):
        passes.append(tuple(tokens.shape))
        return hidden(tokens, *a, **kw)

    sharp_model.hidden_cached = spy
    try:
        dec = build_decoder(dict({"name": "top_prob", "window": 4}, **mode))
        full = assert_batched_equals_row_by_row(lambda xx, aa, s: dec.decode(sharp_model, build_order("random"),
                                                                               xx, aa, row_seeds=s),
                                                x, answer, [1, 2], check_nfe=True)
        passes.clear()
        dec.decode(sharp_model, build_order("random"), x, answer, row_seeds=[1, 2])
    finally:
        del sharp_model.hidden_cached
    whole_batch = [p for p in passes if p == (B, L)]
    one_row = [p for p in passes if p == (1, L)]
    assert len(whole_batch) == 1                   # the first pass only
    assert len(one_row) >= 4                       # the staggered refreshes (drift may add some)
    assert all(p[0] == B and p[1] <= 4 for p in passes if p not in whole_batch + one_row)
    assert not (full.tokens == MASK).any()


def test_a_row_subset_refresh_reads_a_2d_attention_rule(sharp_model):
    """An order may return one [L, L] attention rule for every row: a refresh that runs some
    rows apart must take that rule, not rows of it."""
    base = build_order("random")

    class Banded(type(base)):
        def decode_attention(self, masked, layout):
            L = masked.shape[-1]
            i = torch.arange(L, device=masked.device)
            return i.unsqueeze(0) <= i.unsqueeze(1) + 6      # query i sees keys up to i + 6

    order = Banded.__new__(Banded)
    order.__dict__.update(base.__dict__)
    x, answer = _staggered()
    x = torch.cat([x, x[1:]])                            # rows 1 and 2 refresh together, row 0 apart
    answer = torch.cat([answer, answer[1:]])
    dec = build_decoder({"name": "top_prob", "window": 4, "cache": "dual"})
    assert_batched_equals_row_by_row(lambda xx, aa, s: dec.decode(sharp_model, order, xx, aa, row_seeds=s),
                                     x, answer, [1, 2, 3], check_nfe=True)


def test_query_tokens(tiny_model):
    """Exact work counts: 15 positions, a 12-token answer in windows of 4, one token per step.
    Each window starts with a full pass (15); dual then runs the window's 4 positions for the
    other 3 steps, prefix the positions from the window's start to the end (12, 8, 4)."""
    x0, answer = make_batch(B=1, L=15, prompt=3, seed=0)
    x = torch.where(answer, torch.full_like(x0, MASK), x0)
    for mode, expected in [("dual", 3 * (15 + 3 * 4)), ("prefix", 3 * 15 + 3 * (12 + 8 + 4))]:
        fwd = []
        _decode(tiny_model, build_order("random"), x, answer, {"name": "top_prob", "window": 4, "cache": mode},
                seeds=[0], forwards=fwd)
        assert (fwd[0].query_tokens, fwd[0].calls, fwd[0].refreshes) == (expected, 12, 3), mode


# -- (c) option validation ------------------------------------------------------------------------
@pytest.mark.parametrize("spec, message", [
    ({"cache": "duall"}, "decoder.cache must be one of false, true, 'prefix', 'dual', 'drift', got 'duall'"),
    ({"cache": 1}, "decoder.cache must be one of false, true, 'prefix', 'dual', 'drift', got 1"),
    ({"cache": None}, "decoder.cache must be one of false, true, 'prefix', 'dual', 'drift', got None"),
    ({"cache": "dual", "cache_tol": 0.1}, "decoder.cache_tol=0.1 applies only to decoder.cache='drift', "
                                          "got decoder.cache='dual'"),
    ({"cache": "drift", "cache_tol": -0.1}, "decoder.cache_tol must be a finite number >= 0, got -0.1"),
    ({"cache": "drift", "cache_tol": float("nan")}, "decoder.cache_tol must be a finite number >= 0, got nan"),
    ({"cache": "dual", "cache_every": 0}, "decoder.cache_every must be an integer >= 1, got 0"),
    ({"cache": True, "cache_every": 2}, "decoder.cache_every=2 applies only to decoder.cache in 'prefix', "
                                        "'dual', 'drift', got decoder.cache=True"),
])
def test_bad_options(spec, message):
    with pytest.raises(ValueError) as err:
        build_decoder(dict({"name": "top_prob"}, **spec))
    assert str(err.value) == message


# -- (d) orders with an exact cache keep it -----------------------------------------------------------
@pytest.mark.parametrize("order_spec", ["ar", {"name": "block", "block_size": 4}, {"name": "scatter", "block_size": 4}],
                         ids=_name)
@pytest.mark.parametrize("mode", ["prefix", "dual", "drift"])
def test_exact_orders_use_the_exact_cache(sharp_model, order_spec, mode):
    x, answer = _ragged()
    order = build_order(order_spec)
    dec = {"name": "top_prob", "window": 4, "temperature": 1.0}
    ref = _decode(sharp_model, order, x, answer, dec)
    fwd = []
    got = _decode(sharp_model, order, x, answer, dict(dec, cache=mode), forwards=fwd)
    assert type(fwd[0]) is CachedForward
    assert torch.equal(got.tokens, ref.tokens)
    assert torch.equal(got.trace.finalize_step, ref.trace.finalize_step)


def test_the_benchmark_counts_less_work():
    """``bench cache``'s speed half, small: exact options agree with exact tokens, and the
    approximate caches run fewer query tokens per step than the full length (a count, not a
    timing)."""
    r = bench_cache_speed(d_model=32, n_layers=1, prompt_len=4, answer_len=16, window=4, vocab=16, repeats=3)
    rows = {row["cache"]: row for row in r["results"]}
    rounds = rows["dual"]["speedup_rounds"]  # one ratio per round, sorted; the median is the middle one
    assert len(rounds) == 3 and rounds == sorted(rounds) and rows["dual"]["speedup_median_of_rounds"] == rounds[1]
    assert rows["none (exact)"]["agreement_with_exact"] == rows["true (exact KV cache)"]["agreement_with_exact"] == 1.0
    assert rows["none (exact)"]["query_tokens_per_step"] == 20
    # dual: per window of 4 steps one full pass (20) and 3 passes of the window (4)
    assert rows["dual"]["query_tokens_per_step"] == (20 + 3 * 4) / 4
    assert rows["dual"]["refreshes"] == 4
    assert all(row["aten_calls_per_step"] > 0 for row in rows.values())  # every option's per-op work counted
    # compiled window passes: the same work, its first decode (the compile) timed apart
    assert rows["dual, compiled"]["query_tokens_per_step"] == rows["dual"]["query_tokens_per_step"]
    assert rows["dual, compiled"]["first_decode_wall_seconds_with_compile"] > 0
    assert "first_decode_wall_seconds_with_compile" not in rows["dual"]


def test_rerunning_every_stale_part_is_exact(sharp_model):
    """``bench cache``'s staleness diagnostic: the dual cache that also reruns the prompt and the
    answer before and after the window every step leaves nothing stale, so it decodes exactly;
    each part alone leaves the rest stale and (on this sharp model) changes tokens."""
    x, answer = _ragged()
    order = build_order("random")
    spec = {"name": "top_prob", "window": 4}
    ref = _decode(sharp_model, order, x, answer, spec)

    def rerun_decode(rerun):
        dec = build_decoder(dict(spec, cache="dual"))
        dec.make_forward = lambda model, order, layout, extra: RerunForward(
            model, order, layout, dec.windows(layout), dec.cache_spec, extra, rerun=rerun)
        return dec.decode(sharp_model, order, x, answer, row_seeds=[3, 5, 7, 9])

    before, after = RERUN["prompt + answer before"], RERUN["answer after the window"]
    everything = rerun_decode(lambda w, cur: before(w, cur) | after(w, cur))
    assert torch.equal(everything.tokens, ref.tokens)
    assert torch.equal(everything.trace.finalize_step, ref.trace.finalize_step)
    assert not torch.equal(rerun_decode(RERUN["none (dual)"]).tokens, ref.tokens)


def test_aten_calls_counts_the_operators_called_from_python():
    """``bench cache``'s per-op work count: the operators Python calls, not their inner calls
    (``torch.mm`` is one; ``x.sum().add(1)`` two), so the count is the same on a busy host."""
    from anyorder.bench_cache import aten_calls
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    assert aten_calls(lambda: torch.mm(a, b)) == 1
    assert aten_calls(lambda: a.sum().add(1)) == 2
    assert aten_calls(lambda: torch.nn.functional.rms_norm(a, (8,))) == 1  # a composite: its inner calls not counted
