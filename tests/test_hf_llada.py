"""LLaDA's layout through the Hugging Face backbone (model/hf_llada.py), offline.

``TinyLLaDA`` below reproduces the *interface* of LLaDA's published remote code (Nie et al.,
2025, arXiv 2502.09992), written here from that interface and not from its code: a wrapper whose
one child ``model`` holds ``transformer.{wte, blocks, ln_f, ff_out}``; ``forward(input_ids,
input_embeddings, attention_mask, attention_bias, past_key_values, use_cache,
output_hidden_states)``, where ``attention_bias`` [B, 1, L, L] is *added* to the attention scores
(a bool one is turned into 0 / -inf first); no position ids (RoPE at 0..L-1); no KV cache;
blocks with ``q_proj k_proj v_proj attn_out ff_proj up_proj ff_out``. Tiny and random.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("transformers")

from anyorder.decoding import build_decoder  # noqa: E402
from anyorder.model.hf_backbone import HFBackbone, wrap_hf  # noqa: E402
from anyorder.model.hf_llada import BiasBackbone  # noqa: E402
from anyorder.objectives.nelbo import plan_logits, plan_loss  # noqa: E402
from anyorder.orders import build_order  # noqa: E402
from test_hf_backbone import MASK, PAD, V, backbone, batch  # noqa: E402

D, HEADS = 32, 4


def rope(x: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (Su et al., 2021, arXiv 2104.09864) of [B, H, L, hd] at positions 0..L-1."""
    hd, L = x.shape[-1], x.shape[-2]
    freq = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = torch.arange(L, dtype=torch.float32)[:, None] * freq[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    a, b = x.chunk(2, -1)
    return x * cos + torch.cat([-b, a], -1) * sin


class TinyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn_norm, self.ff_norm = nn.RMSNorm(D), nn.RMSNorm(D)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(D, D, bias=False) for _ in range(3))
        self.attn_out = nn.Linear(D, D, bias=False)
        self.ff_proj, self.up_proj = nn.Linear(D, 2 * D, bias=False), nn.Linear(D, 2 * D, bias=False)
        self.ff_out = nn.Linear(2 * D, D, bias=False)

    def forward(self, x, attention_bias=None):
        B, L, _ = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(B, L, HEADS, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        att = F.scaled_dot_product_attention(rope(q), rope(k), v, attn_mask=attention_bias)
        x = x + self.attn_out(att.transpose(1, 2).reshape(B, L, D))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class TinyLLaDAModel(nn.Module):
    def __init__(self, layers=2):
        super().__init__()
        self.transformer = nn.ModuleDict({"wte": nn.Embedding(V, D), "blocks": nn.ModuleList(TinyBlock() for _ in range(layers)),
                                          "ln_f": nn.RMSNorm(D), "ff_out": nn.Linear(D, V, bias=False)})

    def forward(self, input_ids, input_embeddings=None, attention_mask=None, attention_bias=None,
                past_key_values=None, use_cache=False, output_hidden_states=None):
        assert past_key_values is None and not use_cache, "no KV cache for a masked diffusion model"
        x = self.transformer.wte(input_ids) if input_embeddings is None else input_embeddings
        if attention_bias is not None and attention_bias.dtype == torch.bool:
            attention_bias = torch.zeros(attention_bias.shape).masked_fill(~attention_bias, float("-inf"))
        states = []
        for block in self.transformer.blocks:
            states.append(x)
            x = block(x, attention_bias)
        x = self.transformer.ln_f(x)
        states.append(x)
        return SimpleNamespace(logits=self.transformer.ff_out(x), hidden_states=tuple(states) if output_hidden_states else None)


class TinyLLaDA(nn.Module):
    base_model_prefix = "model"
    _no_split_modules = ["TinyBlock"]

    def __init__(self, layers=2):
        super().__init__()
        self.config = SimpleNamespace(_attn_implementation="eager", hidden_size=D, num_hidden_layers=layers,
                                      num_attention_heads=HEADS, max_sequence_length=64, weight_tying=False)
        self.model = TinyLLaDAModel(layers)

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def get_output_embeddings(self):
        return self.model.transformer.ff_out

    def forward(self, input_ids, **kw):
        return self.model(input_ids, **kw)


def llada(seed=0, extra=None):
    torch.manual_seed(seed)
    hf = TinyLLaDA()
    for p in hf.parameters():
        nn.init.normal_(p, std=0.3) if p.dim() > 1 else nn.init.normal_(p, 1.0, 0.1)
    return wrap_hf(hf, MASK, extra).eval()


def own(m, x, bias=None):
    """The stand-in's own logits (mask column at -inf, as the wrapper sets it)."""
    out = m.hf(x, attention_bias=bias).logits.float()
    out[..., MASK] = float("-inf")
    return out


def prefix_block_mask(x, answer):
    order = build_order({"name": "prefix_block", "block_size": 4})
    layout = order.layout(answer)
    return order, layout, order.decode_attention(answer & (torch.arange(x.shape[1]) >= 8), layout)


def test_the_layout_is_recognised_by_its_forward_not_its_name():
    assert type(llada()) is BiasBackbone
    assert type(backbone("llama")) is HFBackbone and not BiasBackbone.fits(backbone("llama").hf)
    m = llada()
    assert m.shard_units() == list(m.hf.model.transformer.blocks)          # FSDP2 wraps each block


def test_shift_logits_auto_follows_what_the_head_predicts():
    """`generate --shift-logits auto` asks the backbone: an AR LM's head predicts the next token (read
    shifted, as Dream does), a masked LM's and LLaDA's their own position's."""
    assert backbone("llama").head_predicts_next_token is True
    assert backbone("bert").head_predicts_next_token is False
    assert llada().head_predicts_next_token is False


def test_no_mask_is_the_models_own_bidirectional_pass_and_a_mask_its_explicit_bias():
    m = llada()
    x, answer = batch(B=2, L=14, prompt=3)
    order, layout, attn = prefix_block_mask(x, answer)
    with torch.no_grad():
        torch.testing.assert_close(m(x), own(m, x), rtol=1e-5, atol=1e-5)
        bias = attn.expand(2, 14, 14).unsqueeze(1)          # bool: the stand-in converts it itself
        torch.testing.assert_close(m(x, attn_mask=attn), own(m, x, bias), rtol=1e-5, atol=1e-5)
        assert float((m(x, attn_mask=attn) - m(x))[..., :MASK].abs().max()) > 1e-3   # the mask does act


@pytest.mark.parametrize("spec,blind", [({"name": "prefix_block", "block_size": 4}, True), ("random", False)])
def test_a_masked_key_never_reaches_a_query(spec, blind):
    """prefix_block with its third block open: a token of the last block (hidden: after the open
    one) never changes the logits of the prefix or the open block; random (bidirectional): it does."""
    m = llada()
    x, answer = batch(B=1)
    order = build_order(spec)
    layout = order.layout(answer)
    masked = answer & (torch.arange(x.shape[1]) >= 8)
    attn = order.decode_attention(masked, layout)
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % PAD
    with torch.no_grad():
        a, b = m(x, attn_mask=attn), m(y, attn_mask=attn)
    past = torch.arange(x.shape[1]) < 11    # prompt 0..2, blocks 3..6 (finished) and 7..10 (open)
    if blind:
        assert torch.equal(a[0, past], b[0, past])
    else:
        assert float((a[0, past, :MASK] - b[0, past, :MASK]).abs().max()) > 1e-4


def test_extra_embeddings_go_in_as_input_embeddings():
    m = llada(extra={"seg": 3})
    x, answer = batch()
    seg = answer.long()
    with torch.no_grad():
        torch.testing.assert_close(m(x, extra={"seg": seg}), m(x))            # zero tables: unchanged
        m.extra["seg"].weight.normal_()
        emb = m.hf.get_input_embeddings()(x) + m.extra["seg"](seg)
        ref = m.hf(x, input_embeddings=emb).logits.float()
        ref[..., MASK] = float("-inf")
        torch.testing.assert_close(m(x, extra={"seg": seg}), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["random", {"name": "prefix_block", "block_size": 4}, {"name": "scatter", "block_size": 4}])
def test_one_stream_orders_train(spec):
    m = llada()
    x0, answer = batch(B=4, L=14, prompt=2, seed=3)
    order = build_order(spec)
    plan = order.train_plan(x0, order.layout(answer), MASK, torch.Generator().manual_seed(1))
    loss, _ = plan_loss(m.train(), plan)
    loss.backward()
    assert plan.scored.any() and 0 < float(loss.detach()) < float("inf")
    assert m.hf.model.transformer.blocks[0].q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("spec", ["ar", {"name": "block", "block_size": 4}])
def test_two_stream_orders_are_refused_with_the_fix(spec):
    m = llada()
    x0, answer = batch()
    order = build_order(spec)
    plan = order.train_plan(x0, order.layout(answer), MASK, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="takes no position ids .* train it with a one-stream order"):
        plan_logits(m, plan)


def test_decoding_runs_uncached_and_refuses_a_cache():
    """Decoding is one stream under every order (ar and block too); a cache is refused."""
    m = llada()
    x, answer = batch(B=2, L=14, prompt=4)
    x = x.masked_fill(answer, MASK)
    for spec in ("ar", {"name": "block", "block_size": 4}, "random", {"name": "prefix_block", "block_size": 4}):
        out = build_decoder("top_prob").decode(m, build_order(spec), x, answer)
        assert not (out.tokens == MASK).any() and torch.equal(out.tokens[~answer], x[~answer])
    order = build_order({"name": "prefix_block", "block_size": 4})
    for mode in (True, "dual"):
        with pytest.raises(ValueError, match="takes no KV cache .* decode with cache: false"):
            build_decoder({"name": "top_prob", "cache": mode}).decode(m, order, x, answer)


NAMES = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")


@pytest.mark.parametrize("targets,names", [("all-linear", NAMES), (["q_proj", "v_proj", "ff_out"], ("q_proj", "v_proj", "ff_out"))])
def test_lora_adapts_block_projections_but_never_the_head(targets, names):
    """The head ``transformer.ff_out`` shares its last name with each block's ``ff_out``."""
    pytest.importorskip("peft")
    from anyorder.model.lora import LORA_DEFAULTS, apply_lora, merge_lora  # lazy: peft is optional

    m = llada()
    x, answer = batch()
    with torch.no_grad():
        before = m(x)
    apply_lora(m, {**LORA_DEFAULTS, "r": 4, "target_modules": targets, "train_mask_row": False})
    adapted = {n.split(".lora_A")[0].split("transformer.")[1] for n, _ in m.named_parameters() if "lora_A" in n}
    assert adapted == {f"blocks.{i}.{p}" for i in range(2) for p in names}
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {n for n, _ in m.named_parameters() if "lora_" in n}
    with torch.no_grad():
        torch.testing.assert_close(m(x), before)                              # B = 0: unchanged at step 0
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
        lora_logits = m(x)
        assert float((lora_logits - before)[..., :MASK].abs().max()) > 1e-3
        merged = merge_lora(m)(x)
    torch.testing.assert_close(merged, lora_logits, rtol=1e-4, atol=1e-4)


def test_remote_code_refusing_sdpa_gets_the_fix():
    """transformers' error for a remote-code model without sdpa support (LLaDA under 5.x, the
    message as 5.24 words it) becomes one line naming model.attn_implementation=eager."""
    from anyorder.model.hf_backbone import explain_load_error

    exc = ValueError("LLaDAModelLM does not support an attention implementation through "
                     "torch.nn.functional.scaled_dot_product_attention yet. Please request the support ...")
    err = explain_load_error(exc, "models/llada")
    assert "model.attn_implementation=eager" in str(err) and "\n" not in str(err)
