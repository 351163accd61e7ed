"""The trainer's fused AdamW is torch's AdamW: same parameters as the foreach one within float rounding."""
import torch

from anyorder.model import ModelConfig, Transformer
from anyorder.train.optim import build_adamw, fused_supported


def test_fused_adamw_matches_the_default_within_rounding():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=9, mask_id=8, d_model=32, n_layers=1, n_heads=2, max_len=16)
    a, b = Transformer(cfg), Transformer(cfg)
    b.load_state_dict(a.state_dict())
    opt_a = build_adamw([{"params": list(a.parameters()), "weight_decay": 0.1}], 1e-2, (0.9, 0.95), torch.device("cpu"))
    opt_b = torch.optim.AdamW([{"params": list(b.parameters()), "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95),
                              foreach=True)
    assert opt_a.defaults["fused"] is fused_supported(torch.device("cpu")) is True
    x = torch.randint(0, 8, (4, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        for m, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad(set_to_none=True)
            m(x)[..., :8].logsumexp(-1).mean().backward()
            opt.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)
