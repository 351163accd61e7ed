"""model/linear.py: the backbone's linear layer multiplies by transposed weight copies only inside
``multiplying_by`` and without gradients, and only the approximate caches ask it to."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from anyorder.decoding import build_decoder
from anyorder.decoding import approx_cache
from anyorder.model import ModelConfig, Transformer
from anyorder.model.linear import Linear, multiplying_by, transposed_copies
from anyorder.orders import build_order


def _model(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=17, mask_id=16, d_model=32, n_layers=2, n_heads=2, max_len=40)
    cfg.update(kw)
    return Transformer(ModelConfig(**cfg)).eval()


def test_the_layer_is_nn_linear_outside_the_context():
    lin = Linear(8, 5, bias=False)
    x = torch.randn(3, 4, 8)
    assert isinstance(lin, nn.Linear)
    assert torch.equal(lin(x), F.linear(x, lin.weight))
    with torch.no_grad():
        assert torch.equal(lin(x), F.linear(x, lin.weight))


def test_inside_the_context_it_multiplies_by_its_copy_and_only_without_grad():
    lin = Linear(8, 5, bias=False)
    x = torch.randn(3, 4, 8)
    other = torch.randn(8, 5)  # not the weight: proves which matrix the layer used
    with multiplying_by({lin: other}):
        with torch.no_grad():
            assert torch.equal(lin(x), (x.reshape(-1, 8) @ other).view(3, 4, 5))
        y = lin(x)  # gradients on: nn.Linear, so the weight gets its gradient
        assert torch.equal(y, F.linear(x, lin.weight))
        y.sum().backward()
    assert lin.weight.grad is not None
    with torch.no_grad():
        assert torch.equal(lin(x), F.linear(x, lin.weight))  # the context is gone


def test_transposed_copies_cover_every_bias_free_layer_and_compute_the_same_products():
    model = _model()
    copies = transposed_copies(model)
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    assert set(copies) == set(layers) and len(layers) == 2 * 5 + 1  # qkv, proj, gate, up, down; head
    for m, w in copies.items():
        assert w.is_contiguous() and torch.equal(w, m.weight.t())
    x = torch.randint(0, 16, (2, 40))
    with torch.no_grad():
        ref = model(x)
        with multiplying_by(copies):
            got = model(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert "blocks.0.attn.qkv.weight" in model.state_dict()  # checkpoints keep their names


def test_only_the_approximate_caches_multiply_by_the_copies(monkeypatch):
    """Copies that are all zeros change an approximate-cache decode and nothing else: exact
    decoding (cached or not) never reads them."""
    model = _model()
    order = build_order("random")
    x = torch.full((2, 40), 16)
    x[:, :8] = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(1))
    answer = torch.zeros_like(x, dtype=torch.bool)
    answer[:, 8:] = True
    made = []

    def zeros(m):
        copies = {k: torch.zeros_like(v) for k, v in transposed_copies(m).items()}
        made.append(copies)
        return copies

    runs = {}
    for poisoned in (False, True):
        if poisoned:
            monkeypatch.setattr(approx_cache, "transposed_copies", zeros)
        for cache in (False, True, "dual"):
            dec = build_decoder({"name": "top_prob", "window": 8, "cache": cache})
            runs[poisoned, cache] = dec.decode(model, order, x, answer)
    assert len(made) == 1  # one decode made copies: the dual one
    for cache in (False, True):
        assert torch.equal(runs[True, cache].tokens, runs[False, cache].tokens)
        assert torch.equal(runs[True, cache].trace.confidence, runs[False, cache].trace.confidence)
    # all-zero weights: every logit 0 but the mask's, the proposals the lowest token id
    assert not torch.equal(runs[True, "dual"].tokens, runs[False, "dual"].tokens)
