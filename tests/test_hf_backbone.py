"""The Hugging Face backbone: tiny randomly initialised Llama, Qwen2 and BERT models built from
configs (nothing downloaded) run the orders' masks exactly as the native backbone does."""
import pytest
import torch

pytest.importorskip("transformers")

from anyorder.decoding import build_decoder  # noqa: E402
from anyorder.model.hf_backbone import build_hf_backbone  # noqa: E402
from anyorder.objectives.nelbo import plan_logits, plan_loss  # noqa: E402
from anyorder.orders import build_order, masks  # noqa: E402

V, MASK, PAD = 40, 39, 38
_DEC = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": False,
        "initializer_range": 0.2, "bos_token_id": None, "eos_token_id": None, "pad_token_id": PAD}
TINY = {
    "llama": {"model_type": "llama", **_DEC},
    "qwen2": {"model_type": "qwen2", **_DEC},
    "bert": {"model_type": "bert", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "max_position_embeddings": 64, "initializer_range": 0.2},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64,
             "initializer_range": 0.2, "bos_token_id": 0, "eos_token_id": 0},
}
CAUSAL = ("llama", "qwen2")


def backbone(kind, impl="sdpa", shift=False, extra=None, seed=0):
    torch.manual_seed(seed)
    opts = {"backbone": "hf", "from_config": TINY[kind], "attn_implementation": impl, "shift_logits": shift}
    return build_hf_backbone(opts, V, MASK, 64, extra).eval()


def batch(B=2, L=14, prompt=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, PAD, (B, L), generator=g)
    answer = torch.zeros(B, L, dtype=torch.bool)
    answer[:, prompt:] = True
    return x, answer


def decode_masks(x, answer):
    """(name, attention mask) of every fixed order for a half-decoded state of ``x``."""
    masked = answer & (torch.arange(x.shape[1]) >= 8)
    out = []
    for spec in ("random", "ar", {"name": "block", "block_size": 4}, {"name": "prefix_block", "block_size": 4},
                 {"name": "jigsaw", "block_size": 4}, {"name": "scatter", "block_size": 4}):
        order = build_order(spec)
        out.append((order.label(), order.decode_attention(masked, order.layout(answer))))
    return out


# -- the 4-D mask each attention implementation expects ----------------------------------------
@pytest.mark.parametrize("kind", CAUSAL + ("gpt2",))
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_causal_mask_gives_the_models_own_causal_logits(kind, impl):
    m = backbone(kind, impl)
    x, _ = batch()
    L = x.shape[1]
    tril = torch.ones(L, L, dtype=torch.bool).tril().expand(2, L, L)
    with torch.no_grad():
        ours = m(x, attn_mask=tril)
        ref = m.hf(input_ids=x).logits.float()
        naive = m.hf(input_ids=x, attention_mask=tril.unsqueeze(1)).logits.float()  # a bool 4-D mask as is
    keep = torch.arange(V) != MASK
    torch.testing.assert_close(ours[..., keep], ref[..., keep], rtol=1e-5, atol=1e-5)
    assert torch.isinf(ours[..., MASK]).all()
    # the trap the wrapper avoids: eager *adds* a boolean mask to the scores (0/1), so every future
    # key stays visible and the logits are not the causal ones; sdpa reads booleans as masks
    assert torch.allclose(naive, ref, atol=1e-5) == (impl == "sdpa")


def test_bert_without_a_mask_is_its_own_bidirectional_pass():
    m = backbone("bert")
    x, _ = batch()
    with torch.no_grad():
        ours, ref = m(x), m.hf(input_ids=x).logits.float()
    keep = torch.arange(V) != MASK
    torch.testing.assert_close(ours[..., keep], ref[..., keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "bert", "gpt2"])
def test_sdpa_equals_eager_under_every_order_mask(kind):
    sdpa, eager = backbone(kind, "sdpa"), backbone(kind, "eager")
    x, answer = batch()
    with torch.no_grad():
        for label, mask in decode_masks(x, answer):
            torch.testing.assert_close(sdpa(x, attn_mask=mask), eager(x, attn_mask=mask), rtol=1e-4, atol=1e-5,
                                       msg=lambda s: f"{label}: {s}")
        order = build_order({"name": "block", "block_size": 4})  # a two-stream pass: repeated positions
        plan = order.train_plan(x, order.layout(answer), MASK, torch.Generator().manual_seed(1))
        torch.testing.assert_close(plan_logits(sdpa, plan), plan_logits(eager, plan), rtol=1e-4, atol=1e-5)


# -- attention invariances ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "qwen2", "bert", "gpt2"])
@pytest.mark.parametrize("spec,blind", [("ar", True), ({"name": "block", "block_size": 4}, True), ("random", False)])
def test_a_future_token_changes_past_logits_only_without_causality(kind, spec, blind):
    m = backbone(kind)
    x, answer = batch(B=1)
    order = build_order(spec)
    layout = order.layout(answer)
    masked = torch.zeros_like(answer)
    attn = order.decode_attention(masked, layout)
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % PAD                     # the last answer token (its own block under block)
    with torch.no_grad():
        a, b = m(x, attn_mask=attn), m(y, attn_mask=attn)
    past = layout.block[0] < int(layout.block[0, -1])   # prompt and every earlier block / position
    if blind:
        assert torch.equal(a[0, past], b[0, past])
    else:
        assert float((a[0, past, :MASK] - b[0, past, :MASK]).abs().max()) > 1e-4


# -- training: the vectorised two-stream pass ---------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_vectorised_block_loss_equals_per_block_loop(kind):
    m = backbone(kind, extra={"seg": 3})
    with torch.no_grad():
        m.extra["seg"].weight.normal_()                 # non-zero task embeddings, indexed per slot
    x0, answer = batch(B=2, L=14, prompt=2, seed=4)
    extra = {"seg": answer.long()}
    order = build_order({"name": "block", "block_size": 4})
    layout = order.layout(answer)
    plan = order.train_plan(x0, layout, MASK, torch.Generator().manual_seed(5))
    with torch.no_grad():
        vec = plan_logits(m, plan, extra)
        zt = plan.tokens[:, :14]
        loop = torch.zeros_like(vec)
        for b in range(int(layout.n_blocks.max())):
            Lb = int((layout.block[0] <= b).sum())      # prompt + blocks <= b: a prefix here
            inp = torch.where(layout.block == b, zt, x0)[:, :Lb]
            logits = m(inp, attn_mask=masks.block_causal(order.layout(answer[:, :Lb])),
                       extra={"seg": extra["seg"][:, :Lb]})
            sel = layout.block[:, :Lb] == b
            loop[:, :Lb][sel] = logits[sel]
        loss_vec, _ = plan_loss(m, plan, extra)
    sc = plan.scored
    assert sc.any()
    torch.testing.assert_close(vec[sc], loop[sc], rtol=1e-4, atol=1e-4)
    lp = torch.log_softmax(loop, -1).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    assert abs(float((plan.elbo_weight * -lp * sc).sum() / answer.sum()) - float(loss_vec)) < 1e-4


def test_zero_initialised_extra_embeddings_leave_the_model_unchanged():
    plain, with_extra = backbone("llama"), backbone("llama", extra={"row": 5})
    x, _ = batch()
    with torch.no_grad():
        a, b = plain(x), with_extra(x, extra={"row": torch.arange(14) % 5})
    assert torch.equal(a, b)


# -- decoding: left to right == transformers' greedy generate ---------------------------------
@pytest.mark.parametrize("kind", CAUSAL)
def test_ar_left_to_right_equals_transformers_greedy_generate(kind):
    """Prompts of lengths 3, 5, 7 in one batch. transformers pads them on the left (attention
    mask, positions from 0 at each row's first real token); anyorder needs no padding before
    the answer: row b is prompt_b ⊕ [MASK] * G ⊕ pad, the answer starting right after its own
    prompt, and the trailing pads are committed answer tokens that a causal order never attends."""
    m = backbone(kind, shift=True)   # Dream's shift: position i from state i-1 = next-token head
    G, g = 6, torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, PAD, (n,), generator=g) for n in (3, 5, 7)]
    P = max(len(p) for p in prompts)
    left = torch.full((3, P), PAD)
    for b, p in enumerate(prompts):
        left[b, P - len(p):] = p
    with torch.no_grad():
        ref = m.hf.generate(input_ids=left, attention_mask=(left != PAD).long(), max_new_tokens=G,
                            do_sample=False, suppress_tokens=[MASK], pad_token_id=PAD)[:, P:]
    x = torch.full((3, P + G), PAD)
    answer = torch.zeros_like(x, dtype=torch.bool)
    for b, p in enumerate(prompts):
        x[b, :len(p)] = p
        x[b, len(p):len(p) + G] = MASK
        answer[b, len(p):] = True
    order = build_order({"name": "ar", "prompt": "causal"})
    for cache in (False, True):
        res = build_decoder({"name": "left_to_right", "cache": cache}).decode(m, order, x, answer)
        for b, p in enumerate(prompts):
            assert torch.equal(res.tokens[b, len(p):len(p) + G], ref[b]), (cache, b, res.tokens[b], ref[b])
        assert res.trace.nfe.tolist() == [G] * 3


def count_query_tokens(m):
    """A list that collects the number of query tokens of every pass through the base model."""
    seen = []
    m.base.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
    return seen


@pytest.mark.parametrize("kind,shift,spec,decoder", [
    ("llama", True, {"name": "ar", "prompt": "causal"}, {"name": "left_to_right"}),
    ("qwen2", False, "ar", {"name": "left_to_right"}),
    ("qwen2", False, {"name": "block", "block_size": 4}, {"name": "top_prob"}),
    ("llama", True, {"name": "block", "block_size": 4}, {"name": "top_prob", "k": 2}),
    ("gpt2", False, {"name": "block", "block_size": 4}, {"name": "margin"}),
    ("bert", False, {"name": "block", "block_size": 4}, {"name": "top_prob"}),
])
def test_cached_equals_uncached(kind, shift, spec, decoder):
    """The exact KV cache (model/kv_cache.py) through the model's own attention layers: the same
    tokens and trace as uncached decoding, rows with different prompt lengths in one batch, while
    running far fewer query tokens."""
    m = backbone(kind, shift=shift)
    x, answer = batch(B=3, L=18, prompt=4)
    answer[1, :7] = False                                # row 1: a longer prompt
    x = x.masked_fill(answer, MASK)
    order = build_order(spec)
    seen = count_query_tokens(m)
    plain = build_decoder(decoder).decode(m, order, x, answer)
    n_plain = sum(seen)
    seen.clear()
    cached = build_decoder({**decoder, "cache": True}).decode(m, order, x, answer)
    assert torch.equal(plain.tokens, cached.tokens)
    assert torch.equal(plain.trace.finalize_step, cached.trace.finalize_step)
    assert sum(seen) < n_plain / 2, (sum(seen), n_plain)


@pytest.mark.parametrize("mode", [{"cache": "dual"}, {"cache": "drift", "cache_tol": 0.05}], ids=["dual", "drift"])
def test_approximate_caches_batched_equal_row_by_row(mode):
    """An approximate cache through the model's own attention layers, rows refreshing at different
    steps (a row's refresh runs on a copy of its rows of the cache, HF slots included): the
    batch decodes exactly as its rows one by one."""
    m = backbone("llama")
    x, answer = batch(B=3, L=18, prompt=4)
    answer[1, :7] = False                                # row 1: a longer prompt
    given = x.clone()
    x = x.masked_fill(answer, MASK)
    x[2, 4:6] = given[2, 4:6]                            # row 2: two answer tokens given
    order = build_order("random")
    dec = build_decoder({"name": "top_prob", "window": 4, **mode})
    full = dec.decode(m, order, x, answer, row_seeds=[0, 1, 2])
    for b in range(3):
        one = dec.decode(m, order, x[b:b + 1], answer[b:b + 1], row_seeds=[b])
        assert torch.equal(one.tokens[0], full.tokens[b]), b
        assert torch.equal(one.trace.finalize_step[0], full.trace.finalize_step[b]), b
    assert not (full.tokens == MASK).any()


def test_bidirectional_prompt_would_not_match_generate():
    """Why ``prompt: causal``: with anyorder's default (the prompt reads itself both ways) an AR
    model's prompt states differ from its own, so the answer logits do too."""
    m = backbone("llama", shift=True)
    x, answer = batch(B=1, L=10, prompt=6)
    masked = answer.clone()
    causal, default = build_order({"name": "ar", "prompt": "causal"}), build_order("ar")
    with torch.no_grad():
        a = m(x, attn_mask=causal.decode_attention(masked, causal.layout(answer)))
        b = m(x, attn_mask=default.decode_attention(masked, default.layout(answer)))
    assert float((a[0, 6, :MASK] - b[0, 6, :MASK]).abs().max()) > 1e-4


# -- errors --------------------------------------------------------------------------------------
def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not a model directory here.*pass model.path=DIR"):
        build_hf_backbone({"path": str(tmp_path / "nope")}, V, MASK, 64)
    with pytest.raises(ValueError, match="model.attn_implementation must be one of 'sdpa', 'eager', got 'flash_attention_2'"):
        build_hf_backbone({"from_config": TINY["llama"], "attn_implementation": "flash_attention_2"}, V, MASK, 64)
    with pytest.raises(ValueError, match="unknown model option.*d_model.*Valid options"):
        build_hf_backbone({"from_config": TINY["llama"], "d_model": 3}, V, MASK, 64)
    with pytest.raises(ValueError, match="exactly one of model.path"):
        build_hf_backbone({}, V, MASK, 64)
    m = backbone("llama", shift=True)
    x, answer = batch()
    order = build_order({"name": "block", "block_size": 4})
    plan = order.train_plan(x, order.layout(answer), MASK, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="shift_logits=true .* two-stream"):
        plan_logits(m, plan)
    # the cache reads state i-1 for shifted logits; Scatter's column rule neither caches nor reruns it
    with pytest.raises(ValueError, match="shift_logits reads state i-1.*cache: false"):
        build_decoder({"name": "top_prob", "cache": True}).decode(m, build_order({"name": "scatter", "block_size": 4}),
                                                                  x.masked_fill(answer, MASK), answer)


def test_forward_is_head_logits_of_hidden_on_any_rows():
    """Training may project only the scored rows of ``hidden``: the shift lives in ``hidden``."""
    m = backbone("llama", shift=True)
    x, answer = batch()
    with torch.no_grad():
        full, h = m(x), m.hidden(x)
        rows = answer.nonzero(as_tuple=True)
        assert torch.equal(m.head_logits(h[rows]), full[rows])
        ref = m.hf(input_ids=x).logits.float()            # no mask: bidirectional, so compare the shift only
        plain = backbone("llama")(x)
    assert torch.equal(full[:, 1:, :MASK], plain[:, :-1, :MASK]) and not torch.allclose(plain[..., :MASK], ref[..., :MASK])


def test_slot_kv_rows_round_trip_and_refuse_a_cache_that_never_ran():
    """``SlotKV.select_rows`` / ``put_rows`` (a pass on some batch rows of an approximate cache):
    what the sub-cache's pass writes lands in those rows only; putting rows into a cache whose
    buffers do not exist yet is an error, not a silent loss."""
    from anyorder.model.hf_backbone import SlotKV
    full = SlotKV(4)
    full.k = [torch.arange(3 * 2 * 4 * 2, dtype=torch.float32).view(3, 2, 4, 2)]
    full.v = [-full.k[0].clone()]
    full.hidden = torch.ones(3, 4, 5)
    before = [full.k[0].clone(), full.v[0].clone(), full.hidden.clone()]
    rows = torch.tensor([2, 0])
    sub = full.select_rows(rows)
    assert torch.equal(sub.k[0], before[0][[2, 0]]) and torch.equal(sub.hidden, before[2][[2, 0]])
    sub.k[0].add_(100.0)
    sub.v[0].mul_(2.0)
    sub.hidden.zero_()
    full.put_rows(rows, sub)
    assert torch.equal(full.k[0][[2, 0]], before[0][[2, 0]] + 100.0)
    assert torch.equal(full.v[0][[2, 0]], before[1][[2, 0]] * 2.0)
    assert torch.equal(full.hidden[[2, 0]], torch.zeros(2, 4, 5))
    for t, b in zip((full.k[0], full.v[0], full.hidden), before):  # row 1 untouched
        assert torch.equal(t[1], b[1])
    with pytest.raises(RuntimeError, match="has not run every layer on every row"):
        SlotKV(4).put_rows(rows, sub)
