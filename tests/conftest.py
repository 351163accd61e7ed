import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

# The suite's models are tiny: one thread avoids thread-pool overhead and oversubscription when
# tests share the 2 cores (measured: a tiny forward 0.3-0.5 s with 2 busy threads, 1 ms with one).
torch.set_num_threads(1)

from anyorder.model import ModelConfig, Transformer


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=9, mask_id=8, d_model=32, n_layers=2, n_heads=2, max_len=64)
    return Transformer(cfg).eval()


def make_batch(B=3, L=12, prompt=3, vocab=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, vocab, (B, L), generator=g)
    answer = torch.zeros(B, L, dtype=torch.bool)
    answer[:, prompt:] = True
    return x0, answer


def assert_batched_equals_row_by_row(decode_fn, x, answer, seeds, check_nfe=False):
    """``decode_fn(x, answer, row_seeds) -> DecodeResult``: decoding the batch gives exactly what
    decoding each row alone with its own seed gives. Returns the batched result."""
    full = decode_fn(x, answer, list(seeds))
    for b, seed in enumerate(seeds):
        one = decode_fn(x[b:b + 1], answer[b:b + 1], [seed])
        assert torch.equal(one.tokens[0], full.tokens[b])
        assert torch.equal(one.trace.finalize_step[0], full.trace.finalize_step[b])
        if check_nfe:
            assert torch.equal(one.trace.nfe[0], full.trace.nfe[b])
    return full
