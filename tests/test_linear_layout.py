"""model/linear.py: the backbone's linear layer multiplies by transposed weight copies only inside
``multiplying_by`` and without gradients, and only the approximate caches ask it to."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from anyorder.decoding import build_decoder
from anyorder.decoding import approx_cache
from anyorder.model import ModelConfig, Transformer
from anyorder.model.lomdm import LoMDM
from anyorder.model.linear import Linear, multiplying_by
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
            with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: nn.Linear's own cast
                assert torch.equal(lin(x), F.linear(x, lin.weight))
        y = lin(x)  # gradients on: nn.Linear, so the weight gets its gradient
        assert torch.equal(y, F.linear(x, lin.weight))
        y.sum().backward()
    assert lin.weight.grad is not None
    with torch.no_grad():
        assert torch.equal(lin(x), F.linear(x, lin.weight))  # the context is gone


def test_copies_are_made_for_the_layers_that_run_and_compute_the_same_products():
    model = _model()
    copies = {}
    x = torch.randint(0, 16, (2, 40))
    with torch.no_grad():
        ref = model(x)
        with multiplying_by(copies):
            got = model(x)
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    assert set(copies) == set(layers) and len(layers) == 2 * 5 + 1  # qkv, proj, gate, up, down; head
    for m, w in copies.items():
        assert w.is_contiguous() and torch.equal(w, m.weight.t())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert "blocks.0.attn.qkv.weight" in model.state_dict()  # checkpoints keep their names


def _decode_all(model, monkeypatch, poisoned, specs):
    """Decode with every spec; with ``poisoned``, every weight copy is all zeros. Returns the
    results and the layers that made a copy."""
    order = build_order("random")
    x = torch.full((2, 40), 16)
    x[:, :8] = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(1))
    answer = torch.zeros_like(x, dtype=torch.bool)
    answer[:, 8:] = True
    made = []
    real = Linear.transposed_weight

    def copy(self):
        made.append(self)
        return torch.zeros_like(real(self)) if poisoned else real(self)

    monkeypatch.setattr(Linear, "transposed_weight", copy)
    runs = {str(spec): build_decoder(spec).decode(model, order, x, answer) for spec in specs}
    monkeypatch.setattr(Linear, "transposed_weight", real)
    return runs, made


def test_only_the_approximate_caches_multiply_by_the_copies(monkeypatch):
    """Copies that are all zeros change an approximate-cache decode and nothing else: exact
    decoding (cached or not) never reads them, nor does a cache's first, full pass."""
    model = _model()
    exact = [{"name": "top_prob", "window": 8, "cache": c} for c in (False, True)]
    dual = {"name": "top_prob", "window": 8, "cache": "dual"}
    clean, made = _decode_all(model, monkeypatch, False, exact + [dual])
    assert len(made) == 11                       # one copy per layer, for the one dual decode
    poisoned, _ = _decode_all(model, monkeypatch, True, exact + [dual])
    for spec in exact:
        assert torch.equal(poisoned[str(spec)].tokens, clean[str(spec)].tokens)
        assert torch.equal(poisoned[str(spec)].trace.confidence, clean[str(spec)].trace.confidence)
    # all-zero weights after the first pass: every logit 0 but the mask's, the lowest token id wins
    assert not torch.equal(poisoned[str(dual)].tokens, clean[str(dual)].tokens)


def test_a_forward_used_once_makes_no_copies_and_keeps_the_bits(monkeypatch):
    """Decoders that build a forward for a single pass (remask's, beam's and edit's probes) pay
    for no copies: an approximate cache's first pass is the exact full pass, bit for bit."""
    model = _model()
    order = build_order("random")
    answer = torch.zeros(1, 40, dtype=torch.bool)
    answer[:, 8:] = True
    x = torch.randint(0, 16, (1, 40), generator=torch.Generator().manual_seed(2)).masked_fill(answer, 16)
    made = []
    monkeypatch.setattr(Linear, "transposed_weight", lambda self: made.append(self) or self.weight.detach().t().contiguous())
    forward = build_decoder({"name": "top_prob", "window": 8, "cache": "dual"}).make_forward(model, order,
                                                                                            order.layout(answer))
    with torch.no_grad():
        got = forward(x, answer)
        ref = model(x)
        assert made == [] and torch.equal(got, ref)
        forward(x, answer)                           # a second pass: now the copies
    assert len(made) == 11


def test_lomdm_copies_only_the_layers_a_decode_runs(monkeypatch):
    """LoMDM's schedule heads never run in a decode: no copies of their weights."""
    model = LoMDM(_model()).eval()
    _, made = _decode_all(model, monkeypatch, False, [{"name": "top_prob", "window": 8, "cache": "dual"}])
    backbone = {id(m) for m in model.backbone.modules() if isinstance(m, Linear)}
    assert made and {id(m) for m in made} == backbone


def test_products_multiply_as_the_layers_do_inside_and_outside_the_context():
    """``products`` (the cached pass calls no module): the same products, bit for bit, as each
    layer's own forward, with copies made once per layer (and only inside the context)."""
    from anyorder.model.linear import active_copies, products
    layers = (Linear(8, 12, bias=False), None, Linear(12, 8, bias=False))
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        mul, ws = products(layers, active_copies())
        assert mul is F.linear and ws[0] is layers[0].weight and ws[1] is None
        assert torch.equal(mul(x, ws[0]), layers[0](x))
        copies = {}
        with multiplying_by(copies):
            mul, ws = products(layers, active_copies())
            assert set(copies) == {layers[0], layers[2]} and ws[2] is copies[layers[2]]
            assert torch.equal(mul(mul(x, ws[0]), ws[2]), layers[2](layers[0](x)))
            assert products(layers, active_copies())[1][0] is ws[0]  # made once
    with multiplying_by({}):
        assert active_copies() is None  # gradients on: the layers' own weights
    biased = (Linear(8, 4, bias=True),)
    with pytest.raises(ValueError, match="products: every layer must be bias-free"):
        products(biased)
