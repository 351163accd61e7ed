"""The model's cached pass (model/transformer.py): the cheaper forms give the same bits.

- RoPE as ``x * cos + swap(x) * sin`` on queries and keys at once == the textbook per-tensor
  ``[x1 cos - x2 sin, x1 sin + x2 cos]`` (fp32 and bf16);
- ``forward_cached(attn_mask=None)`` (no mask for SDPA) == the same pass under the explicit mask
  that shows every slot but the scratch one, logits and written K/V;
- positions are checked against ``max_len`` without reading the device (the cache's length);
- RoPE tables read from the per-device table of every position == computed at the positions;
- RMSNorm through the fused kernel (float32) == the textbook lines, values and gradients.
"""
import pytest
import torch

from anyorder.model import ModelConfig, Transformer
from anyorder.model.kv_cache import KVCache
from anyorder.model.transformer import apply_rope, rope_tables


def textbook_rope(x, positions, head_dim, base):
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    ang = positions.float().unsqueeze(-1) * inv
    cos, sin = ang.cos().unsqueeze(1).to(x.dtype), ang.sin().unsqueeze(1).to(x.dtype)
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_same_bits_as_textbook(dtype):
    g = torch.Generator().manual_seed(0)
    B, H, L, hd = 2, 3, 17, 16
    qk = torch.randn(2, B, H, L, hd, generator=g).to(dtype)
    positions = torch.randint(0, 500, (B, L), generator=g)
    cos, sin = rope_tables(positions, hd, 10000.0)
    q, k = apply_rope(qk, cos.unsqueeze(1), sin.unsqueeze(1))
    assert torch.equal(q, textbook_rope(qk[0], positions, hd, 10000.0))
    assert torch.equal(k, textbook_rope(qk[1], positions, hd, 10000.0))


def test_cached_pass_without_mask_same_bits():
    torch.manual_seed(0)
    L, Q, start = 40, 8, 12
    model = Transformer(ModelConfig(vocab_size=33, mask_id=32, d_model=64, n_layers=2, n_heads=2, max_len=L)).eval()
    x = torch.randint(0, 32, (1, L))
    pos = torch.arange(start, start + Q).unsqueeze(0)
    caches, logits = [], []
    with torch.no_grad():
        for mask in (None, torch.ones(1, Q, L + 1, dtype=torch.bool)):
            if mask is not None:
                mask[..., L] = False
            cache = KVCache(model, 1, L)
            everything = torch.arange(L).unsqueeze(0)
            model.forward_cached(x, everything, cache, everything, torch.ones(1, L, L + 1, dtype=torch.bool)
                                 .index_fill_(2, torch.tensor([L]), False))
            logits.append(model.forward_cached(x[:, start:start + Q], pos, cache, pos, mask))
            caches.append(cache)
    assert torch.equal(logits[0], logits[1])
    assert all(torch.equal(a, b) for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v))
    # and both equal the uncached pass's logits at those rows (within rounding: other kernels)
    full = model(x)[:, start:start + Q]
    assert torch.allclose(logits[0], full, atol=1e-5, rtol=1e-5)


def test_position_check_without_device_read():
    model = Transformer(ModelConfig(vocab_size=9, mask_id=8, d_model=16, n_layers=1, n_heads=2, max_len=10))
    cache = KVCache(model, 1, 11)
    pos = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"position 10 exceeds model.max_len=10"):
        model.forward_cached(torch.zeros(1, 1, dtype=torch.long), pos, cache, pos, None)
    with pytest.raises(ValueError, match=r"position 10 exceeds model.max_len=10"):
        model(torch.zeros(1, 11, dtype=torch.long))
    with pytest.raises(ValueError, match=r"position 12 exceeds model.max_len=10"):
        model(torch.zeros(1, 3, dtype=torch.long), positions=torch.tensor([0, 12, 1]))


@pytest.mark.parametrize("head_dim", [8, 12, 64])
def test_rope_at_same_bits_as_rope_tables(head_dim):
    """The model reads RoPE tables made once for every position: the same bits as computing them
    at the positions asked (batch rows, any order, repeats)."""
    model = Transformer(ModelConfig(vocab_size=9, mask_id=8, d_model=2 * head_dim, n_layers=1, n_heads=2, max_len=300))
    positions = torch.randint(0, 300, (3, 41), generator=torch.Generator().manual_seed(head_dim))
    cos, sin = model.rope_at(positions)
    ref_cos, ref_sin = rope_tables(positions, head_dim, model.cfg.rope_base)
    assert torch.equal(cos, ref_cos.unsqueeze(1)) and torch.equal(sin, ref_sin.unsqueeze(1))
    assert "_rope_table" not in model.state_dict()


@pytest.mark.parametrize("shape", [(1, 32, 256), (4, 19, 64), (7, 128)])
def test_rms_norm_fused_same_bits(shape):
    """RMSNorm runs PyTorch's fused kernel in float32: the same values and gradients (input and
    weight) as the textbook lines it replaces; bfloat16 inputs keep the textbook path (float32 out)."""
    from anyorder.model.transformer import RMSNorm
    g = torch.Generator().manual_seed(1)
    norm = RMSNorm(shape[-1])
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g))
    x = (3 * torch.randn(*shape, generator=g)).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    w_ref = norm.weight.detach().clone().requires_grad_()
    out = norm(x)
    xf = x_ref.float()
    ref = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).type_as(x_ref) * w_ref
    assert torch.equal(out, ref)
    grad = torch.randn(*shape, generator=g)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(out, (x, norm.weight), grad),
                                                 torch.autograd.grad(ref, (x_ref, w_ref), grad)))
    assert norm(x.detach().bfloat16()).dtype == torch.float32
