"""One-off check of the hf backbone's LLaDA layout against LLaDA's published modelling code.

    python -m anyorder.studies.llada_check DIR [--json]

DIR holds ``modeling_llada.py`` and ``configuration_llada.py`` as published with the LLaDA
checkpoints (Nie et al., 2025, arXiv 2502.09992; nothing of them is copied here). They are copied
into a temporary directory beside a tiny random config (2 blocks, width 64, vocabulary 300), the
model is built from that config with ``trust_remote_code``, wrapped by
:func:`anyorder.model.hf_backbone.wrap_hf`, and compared with the model's own forward:

- no mask: the wrapper's logits against the model's default (bidirectional) pass;
- a ``prefix_block`` decoding mask: the wrapper against the model given the same mask as an
  explicit ``attention_bias``, additive (0 / float32 min) and boolean (which the model converts
  itself, to 1 / min: a constant shift of the allowed scores that softmax cancels), and how much
  the mask changes the logits (it must);
- a token after the open block changes no logits of the prefix or the open block;
- a two-stream ``block`` training pass is refused; LoRA's ``all-linear`` adapts the blocks and not
  the head; FSDP's shard units are the blocks;
- saved and loaded back through ``model.path`` (what a config does), which needs the
  transformers major version the code was written for.

Not a test: it needs LLaDA's code, which is not in this repository.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
from pathlib import Path

import torch

from ..model.hf_backbone import build_hf_backbone, wrap_hf
from ..objectives.nelbo import plan_logits
from ..orders import build_order

V, MASK = 300, 299
TINY = {"architectures": ["LLaDAModelLM"], "model_type": "llada",
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
        "activation_type": "silu", "alibi": False, "block_group_size": 1, "block_type": "llama", "d_model": 64,
        "n_heads": 4, "n_kv_heads": 4, "n_layers": 2, "mlp_hidden_size": 128, "mlp_ratio": 4, "embedding_size": V,
        "vocab_size": V, "max_sequence_length": 128, "flash_attention": False, "include_bias": False,
        "include_qkv_bias": False, "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
        "rms_norm_eps": 1e-5, "rope": True, "rope_full_precision": True, "rope_theta": 10000.0, "scale_logits": False,
        "use_cache": False, "weight_tying": False, "init_device": "cpu", "init_fn": "mitchell", "init_std": 0.02,
        "mask_token_id": MASK, "attention_dropout": 0.0, "embedding_dropout": 0.0, "residual_dropout": 0.0,
        "pad_token_id": 1, "eos_token_id": 2}


def check(code_dir: str) -> dict:
    import transformers  # lazy: optional dependency (the 'hf' extra)

    tmp = Path(tempfile.mkdtemp(prefix="llada_check_"))
    for name in ("modeling_llada.py", "configuration_llada.py"):
        shutil.copy(Path(code_dir) / name, tmp / name)
    (tmp / "config.json").write_text(json.dumps(TINY))
    torch.manual_seed(0)
    conf = transformers.AutoConfig.from_pretrained(tmp, trust_remote_code=True)
    hf = transformers.AutoModelForCausalLM.from_config(conf, trust_remote_code=True, attn_implementation="eager")
    with torch.no_grad():  # random weights of a useful scale (matrices N(0, 0.2), norms near 1)
        for p in hf.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.normal_(1.0, 0.1)
    m = wrap_hf(hf, MASK).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, MASK, (2, 24), generator=g)
    answer = torch.zeros(2, 24, dtype=torch.bool)
    answer[:, 6:] = True
    order = build_order({"name": "prefix_block", "block_size": 4})
    layout = order.layout(answer)
    attn = order.decode_attention(answer & (torch.arange(24) >= 14), layout)   # blocks 14..17 open

    def own(tokens, bias=None):
        out = m.base(input_ids=tokens, attention_bias=bias).logits.float()
        return out[..., :MASK]

    res = {"transformers": transformers.__version__, "backbone": type(m).__name__,
           "shard_units": [type(u).__name__ for u in m.shard_units()]}
    with torch.no_grad():
        res["no_mask_max_abs_diff"] = float((m(x)[..., :MASK] - own(x)).abs().max())
        masked = m(x, attn_mask=attn)[..., :MASK]
        allow = attn.expand(2, 24, 24).unsqueeze(1)
        # the model's own conversion of a bool bias gives allowed keys +1.0 (softmax cancels it: float noise)
        res["prefix_block_vs_bool_bias_max_abs_diff"] = float((masked - own(x, allow.contiguous())).abs().max())
        explicit = torch.zeros(allow.shape).masked_fill(~allow, torch.finfo(torch.float32).min)
        res["prefix_block_vs_float_bias_max_abs_diff"] = float((masked - own(x, explicit)).abs().max())
        res["prefix_block_vs_no_mask_max_abs_diff"] = float((masked - own(x)).abs().max())
        y = x.clone()
        y[:, -1] = (x[:, -1] + 1) % MASK
        seen = torch.arange(24) < 18                     # prompt, finished blocks, the open block
        res["future_token_changes_seen_logits"] = not torch.equal(m(y, attn_mask=attn)[:, seen], m(x, attn_mask=attn)[:, seen])
    block = build_order({"name": "block", "block_size": 4})
    plan = block.train_plan(x, block.layout(answer), MASK, torch.Generator().manual_seed(0))
    try:
        plan_logits(m, plan)
        res["two_stream_refused"] = None
    except ValueError as exc:
        res["two_stream_refused"] = str(exc)
    try:
        from ..model.lora import LORA_DEFAULTS, apply_lora  # lazy: peft is optional

        lora = wrap_hf(copy.deepcopy(hf), MASK)   # adapters go in in place: keep hf plain for the save below
        apply_lora(lora, {**LORA_DEFAULTS, "r": 2})
        res["lora_adapted"] = sorted({n.split(".lora_A")[0].split("transformer.")[1]
                                      for n, _ in lora.named_parameters() if "lora_A" in n})
    except ModuleNotFoundError as exc:
        res["lora_adapted"] = str(exc)
    try:  # the path a config's model.path takes: save, then load through build_hf_backbone
        hf.save_pretrained(tmp / "saved")
        for name in ("modeling_llada.py", "configuration_llada.py"):
            shutil.copy(tmp / name, tmp / "saved" / name)
        back = build_hf_backbone({"path": str(tmp / "saved"), "trust_remote_code": True,
                                  "attn_implementation": "eager"}, V, MASK).eval()
        with torch.no_grad():
            res["load_by_path"] = f"ok, max |diff| {float((back(x) - m(x))[..., :MASK].abs().max()):.3g}"
    except Exception as exc:  # report, do not hide: the recipe's blocker on this transformers version
        res["load_by_path"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    shutil.rmtree(tmp, ignore_errors=True)
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("code_dir", help="a directory holding modeling_llada.py and configuration_llada.py")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    res = check(args.code_dir)
    print(json.dumps(res, indent=1) if args.json else "\n".join(f"{k}: {v}" for k, v in res.items()))


if __name__ == "__main__":
    main()
