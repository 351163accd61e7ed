"""The plain reference of ``anyorder bench train`` is anyorder's backbone written plainly, and the
benchmark reports step-time and memory ratios to it."""
import pytest
import torch

from anyorder.bench_train import PlainTransformer, bench_train_vs_reference, reference_loss
from anyorder.model import ModelConfig, Transformer


def test_the_plain_reference_computes_the_same_network():
    """Same parts and sizes: with anyorder's weights copied in, the same logits (mask column aside)."""
    torch.manual_seed(0)
    ours = Transformer(ModelConfig(vocab_size=17, mask_id=16, d_model=64, n_layers=2, n_heads=2, max_len=24))
    plain = PlainTransformer(17, 64, 2, 2, 24)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in ours.parameters())
    sd = ours.state_dict()
    mapping = {"emb.weight": "tok.weight", "norm.weight": "norm.weight", "head.weight": "head.weight"}
    for i in range(2):
        for a, b in (("norm1", "norm1"), ("norm2", "norm2"), ("qkv", "attn.qkv"), ("proj", "attn.proj"),
                     ("gate", "mlp.gate"), ("up", "mlp.up"), ("down", "mlp.down")):
            mapping[f"blocks.{i}.{a}.weight"] = f"blocks.{i}.{b}.weight"
    plain.load_state_dict({k: sd[v] for k, v in mapping.items()})
    x = torch.randint(0, 16, (3, 24))
    with torch.no_grad():
        a, b = ours(x)[..., :16], plain(x)[..., :16]
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    loss = reference_loss(plain, x, 16, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and 0 < float(loss.detach()) < 100


def _run(memory):
    r = bench_train_vs_reference(d_model=32, n_layers=1, vocab=64, seq_len=16, batch_sizes={"fp32": 4},
                                 rounds={"fp32": 1}, precisions=("fp32",), memory=memory)
    rows = {row["runner"]: row for row in r["results"]}
    assert set(rows) == {"plain reference", "anyorder random", "anyorder block"}
    assert rows["plain reference"]["ratio_to_reference"] == 1.0
    assert all(row["step_seconds"] > 0 and row["ratio_to_reference"] > 0 for row in rows.values())
    return rows


def test_the_benchmark_reports_step_time_ratios():
    _run(memory=False)


@pytest.mark.slow  # three fresh processes (one per runner) for the peak memory
def test_the_benchmark_reports_peak_memory():
    rows = _run(memory=True)
    assert all(row["peak_growth_mb"] >= 0 and "memory_ratio_to_reference" in row for row in rows.values())
