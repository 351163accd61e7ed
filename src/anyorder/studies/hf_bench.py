"""Training step time of the Hugging Face backbone against the native one of the same size.

Both are the same architecture (pre-norm, RoPE, SwiGLU of the same width, untied head): the
native :class:`~anyorder.model.Transformer` and a randomly initialised ``transformers`` Llama
behind :class:`~anyorder.model.hf_backbone.HFBackbone`. One step = the order's training plan,
:func:`~anyorder.objectives.nelbo.plan_loss`, backward and an AdamW update, on the same batch.
Steps alternate between the two models (round robin) and the best of ``repeats`` is kept, so a
noisy, shared machine affects both alike; the number to read is the ratio.

    python -m anyorder.studies.hf_bench [--json]
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Dict

import torch

from ..model import ModelConfig, Transformer
from ..model.hf_backbone import build_hf_backbone
from ..objectives.nelbo import plan_loss
from ..orders import build_order


def llama_like(d: int, layers: int, heads: int, vocab: int, max_len: int) -> Dict:
    """The transformers config of the native backbone's shape (its SwiGLU width: 2/3 of 4d)."""
    return {"model_type": "llama", "hidden_size": d, "intermediate_size": int(2 * 4 * d / 3),
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
            "max_position_embeddings": max_len, "tie_word_embeddings": False}


def bench_hf_step(d: int = 128, layers: int = 4, heads: int = 4, vocab: int = 1024, batch: int = 16,
                  length: int = 128, orders=("random", {"name": "block", "block_size": 8}), repeats: int = 8,
                  seed: int = 0) -> Dict:
    torch.manual_seed(seed)
    mask_id = vocab - 1
    native = Transformer(ModelConfig(vocab_size=vocab, mask_id=mask_id, d_model=d, n_layers=layers, n_heads=heads,
                                     max_len=length))
    hf = build_hf_backbone({"from_config": llama_like(d, layers, heads, vocab, length)}, vocab, mask_id, length)
    models = {"native": native, "hf": hf}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, vocab - 1, (batch, length), generator=g)
    answer = torch.zeros_like(x0, dtype=torch.bool)
    answer[:, length // 4:] = True
    out = {"shape": {"d_model": d, "n_layers": layers, "n_heads": heads, "vocab": vocab, "batch": batch,
                     "length": length, "threads": torch.get_num_threads()},
           "params": {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}}
    for spec in orders:
        order = build_order(spec)
        plan = order.train_plan(x0, order.layout(answer), mask_id, torch.Generator().manual_seed(1))
        best = {k: float("inf") for k in models}
        for r in range(repeats + 1):                 # the first round warms up and is not counted
            for k, m in models.items():
                t0 = time.perf_counter()
                loss, _ = plan_loss(m, plan)
                loss.backward()
                opts[k].step()
                opts[k].zero_grad(set_to_none=True)
                if r:
                    best[k] = min(best[k], time.perf_counter() - t0)
        out[order.label()] = {"native_s": round(best["native"], 4), "hf_s": round(best["hf"], 4),
                              "hf_over_native": round(best["hf"] / best["native"], 3)}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m anyorder.studies.hf_bench", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--repeats", type=int, default=8)
    args = p.parse_args(argv)
    print(json.dumps(bench_hf_step(repeats=args.repeats), indent=None if args.json else 1))


if __name__ == "__main__":
    main()
