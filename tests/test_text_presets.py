"""The text comparison presets: the CPU one and the paper-scale ones expand to the same seven
orders, and the paper ones have the papers' backbone (12 layers, width 768: ~85M parameters
besides the embedding and the output head)."""
from pathlib import Path

import pytest
import torch

from anyorder.model import ModelConfig, Transformer
from anyorder.sweep import expand, load_sweep

ROOT = Path(__file__).resolve().parents[1]
ORDERS = ["random", "learned", "ar", "block-4", "block-8", "block-16", "scatter-8"]
CPU_ORDERS = ORDERS + ["learned-0.01", "learned-0.01-True"]  # + LoMDM: 10x head lr, and centred logits


@pytest.mark.parametrize("preset,vocab,length", [("paper/lm1b_bert", 30523, 128), ("paper/owt_gpt2", 50258, 1024),
                                                 ("compare_cpu", 4096, 128)])
def test_text_preset_grid_and_backbone(preset, vocab, length):
    runs = expand(load_sweep(ROOT / "configs" / "text" / f"{preset}.yaml"))
    assert [label.split(",")[0].removeprefix("order=") for label, _ in runs] == (
        CPU_ORDERS if preset == "compare_cpu" else ORDERS)
    cfgs = [cfg for _, cfg in runs]
    assert len({c["train"]["flops_budget"] for c in cfgs}) == 1  # equal compute
    cfg = cfgs[0]
    assert cfg["task"]["seq_len"] == length
    with torch.device("meta"):  # sizes only: no memory, no data
        model = Transformer(ModelConfig(vocab_size=vocab, mask_id=vocab - 1, max_len=length, **cfg["model"]))
    body = sum(p.numel() for name, p in model.named_parameters() if not name.startswith(("tok.", "head.")))
    if preset.startswith("paper/"):
        assert (cfg["model"]["n_layers"], cfg["model"]["d_model"]) == (12, 768)
        assert 80e6 < body < 90e6, body
