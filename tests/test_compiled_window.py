"""``Decoder(cache=..., compile=True)`` (model/compiled.py): the approximate caches' window passes
compiled give the eager passes' decode, a failed compile falls back with one warning, and the
option is validated."""
import warnings

import pytest
import torch

from anyorder.decoding import build_decoder
from anyorder.model import ModelConfig, Transformer
from anyorder.model import compiled
from anyorder.orders import build_order

from conftest import make_batch

MASK = 8


@pytest.fixture()
def model():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=9, mask_id=MASK, d_model=32, n_layers=2, n_heads=2, max_len=64)).eval()
    with torch.no_grad():
        m.head.weight.mul_(4.0)  # peaked distributions: no near-ties for last-bit differences to flip
    return m


def _batch():
    x0, answer = make_batch(B=3, L=20, prompt=4, seed=1)
    answer[1, 4:6] = False  # rows of different answer lengths: padded window passes
    return torch.where(answer, torch.full_like(x0, MASK), x0), answer


def _decode(model, spec):
    x, answer = _batch()
    return build_decoder(spec).decode(model, build_order("random"), x, answer, row_seeds=[1, 2, 3])


def _ours(caught):
    return [w for w in caught if "decoder.compile" in str(w.message)]


@pytest.mark.parametrize("mode", ["dual", "prefix"])
def test_compiled_window_passes_decode_as_the_eager_ones(model, mode):
    spec = {"name": "top_prob", "window": 4, "cache": mode}
    eager = _decode(model, spec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _decode(model, dict(spec, compile=True))
        again = _decode(model, dict(spec, compile=True))  # the model's compiled blocks, reused
    assert _ours(caught) == []  # it compiled: no fallback
    assert isinstance(model.__dict__["_compiled_blocks"], compiled.CompiledBlocks)
    assert model.__dict__["_compiled_blocks"].failed is None
    assert torch.equal(got.tokens, eager.tokens) and torch.equal(again.tokens, eager.tokens)
    torch.testing.assert_close(got.trace.confidence, eager.trace.confidence, rtol=1e-5, atol=1e-6)


def test_a_failed_compile_warns_once_and_decodes_eagerly(model, monkeypatch):
    def broken(fn):
        def run(*a):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return run

    monkeypatch.setattr(compiled.torch, "compile", broken)
    spec = {"name": "top_prob", "window": 4, "cache": "dual"}
    eager = _decode(model, spec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _decode(model, dict(spec, compile=True))
        again = _decode(model, dict(spec, compile=True))
    ours = _ours(caught)
    assert len(ours) == 1 and "RuntimeError: no C++ compiler found); the window passes run uncompiled" in str(ours[0].message)
    assert torch.equal(got.tokens, eager.tokens) and torch.equal(again.tokens, eager.tokens)
    assert torch.equal(got.trace.confidence, eager.trace.confidence)


def test_the_option_is_validated():
    with pytest.raises(ValueError, match="decoder.compile=true applies only to decoder.cache in 'prefix', 'dual', "
                                         "'drift' .*got decoder.cache=False"):
        build_decoder({"name": "top_prob", "compile": True})
    with pytest.raises(ValueError, match="decoder.compile"):
        build_decoder({"name": "top_prob", "cache": "dual", "compile": "yes"})

    class OtherBackbone(torch.nn.Module):
        pass

    x, answer = _batch()
    order = build_order("random")
    dec = build_decoder({"name": "top_prob", "window": 4, "cache": "dual", "compile": True})
    with pytest.raises(ValueError, match=r"decoder.compile=true needs anyorder's own transformer "
                                         r"\(model.backbone: native\), got OtherBackbone"):
        dec.make_forward(OtherBackbone(), order, order.layout(answer))
