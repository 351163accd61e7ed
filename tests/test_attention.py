"""Changing a token changes other positions' logits only where the order's attention allows."""
import torch

from anyorder.orders import masks
from anyorder.orders import build_order

from conftest import make_batch


def _delta(model, x, attn, pos):
    """Which positions' logits change when the token at `pos` changes."""
    x2 = x.clone()
    x2[0, pos] = (x2[0, pos] + 1) % 8
    with torch.no_grad():
        a = model(x, attn_mask=attn)
        b = model(x2, attn_mask=attn)
    return ((a - b)[..., :-1].abs().amax(-1) > 1e-6)[0]  # last column is the mask token (-inf)


def test_random_future_changes_past(tiny_model):
    x0, answer = make_batch(B=1, L=12, prompt=3, seed=1)
    order = build_order("random")
    changed = _delta(tiny_model, x0, order.decode_attention(answer, order.layout(answer)), pos=10)
    assert changed[:10].all()


def test_ar_future_does_not_change_past(tiny_model):
    x0, answer = make_batch(B=1, L=12, prompt=3, seed=1)
    order = build_order("ar")
    lay = order.layout(answer)
    changed = _delta(tiny_model, x0, order.decode_attention(answer, lay), pos=8)
    assert not changed[:8].any()
    assert changed[9:].all()


def test_block_future_block_does_not_change_past_blocks(tiny_model):
    x0, answer = make_batch(B=1, L=15, prompt=3, seed=1)   # answer 12 = 3 blocks of 4
    order = build_order({"name": "block", "block_size": 4})
    lay = order.layout(answer)
    attn = order.decode_attention(answer, lay)
    changed = _delta(tiny_model, x0, attn, pos=3 + 4 + 1)          # inside block 1
    assert not changed[: 3 + 4].any()                               # prompt + block 0 untouched
    assert changed[3 + 4: 3 + 8].all()                              # its own block sees it (bidirectional)
    assert changed[3 + 8:].all()                                    # later blocks see it


def test_prompt_never_sees_answer(tiny_model):
    x0, answer = make_batch(B=1, L=12, prompt=3, seed=1)
    for name in ["ar", "block", "prefix_block", "jigsaw", "scatter"]:
        order = build_order(name)
        attn = order.decode_attention(answer & False | answer, order.layout(answer))
        changed = _delta(tiny_model, x0, attn, pos=9)
        assert not changed[:3].any(), name


def test_jigsaw_masked_blocks_cannot_see_each_other(tiny_model):
    x0, answer = make_batch(B=1, L=15, prompt=3, seed=2)
    lay = build_order({"name": "jigsaw", "block_size": 4}).layout(answer)
    visible = answer & (lay.block == 0)                 # block 0 visible, blocks 1 and 2 masked
    attn = masks.jigsaw(lay, visible)
    changed = _delta(tiny_model, x0, attn, pos=3 + 8 + 1)          # a token of masked block 2
    assert not changed[: 3 + 8].any()                               # block 1 (masked) and block 0 blind to it
    assert not changed[3 + 8].any() and changed[3 + 8 + 1:].all()   # causal inside block 2
    changed = _delta(tiny_model, x0, attn, pos=3 + 1)               # a token of visible block 0
    assert changed[3 + 4:].all()                                    # every masked block sees it


def test_scatter_offset_rule(tiny_model):
    x0, answer = make_batch(B=1, L=15, prompt=3, seed=3)
    order = build_order({"name": "scatter", "block_size": 4})
    lay = order.layout(answer)
    attn = order.decode_attention(answer, lay)
    pos = 3 + 4 + 2                                                 # block 1, offset 2
    changed = _delta(tiny_model, x0, attn, pos=pos)
    off = lay.offset[0]
    assert not changed[(off >= 0) & (off < 2)].any()                # earlier columns never see it
    assert not changed[:3].any()
    assert changed[off >= 2].all()                                  # its column and later, in every block


def test_prefix_block_hides_everything_after_current_block(tiny_model):
    x0, answer = make_batch(B=1, L=15, prompt=3, seed=4)
    order = build_order({"name": "prefix_block", "block_size": 4})
    lay = order.layout(answer)
    masked = answer & (lay.block >= 1)                              # block 1 is current
    attn = order.decode_attention(masked, lay)
    changed = _delta(tiny_model, x0, attn, pos=3 + 8 + 1)           # block 2: invisible
    assert not changed[: 3 + 8].any()
    changed = _delta(tiny_model, x0, attn, pos=3 + 4 + 1)           # block 1: prefix sees it (bidirectional)
    assert changed[3: 3 + 8].all()
