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
