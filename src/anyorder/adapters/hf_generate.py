"""``anyorder generate``: decode a local Hugging Face model directory under any order and decoder.

The directory holds a model (``config.json`` + weights) and its tokenizer. The model is wrapped
by :class:`~anyorder.model.hf_backbone.HFBackbone`; its mask id is the tokenizer's mask token, the
known id of a public masked-diffusion checkpoint, ``mask_id``, or (``add_mask_token``) a new
``[MASK]`` token whose embedding row is new and untrained (fine-tune before trusting its
output). Each prompt decodes alone (a batch of one), so prompts of any lengths need no padding;
row b samples with seed ``seed + b``.

A directory written by ``anyorder export`` holds ``anyorder.json``: its mask id, ``shift_logits``,
attention implementation, order, first decoder and prompt format (``--chat``) are the defaults
here, so the exported model decodes as its run did; a flag given on the command line wins.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..decoding import build_decoder
from ..orders import build_order
from ..data.chat_format import generation_prompt_ids
from ..model.hf_backbone import HFBackbone, build_hf_backbone, explain_load_error
from .hf import KNOWN_MASK_IDS
from .hf_export import read_export_info


def load_generator(model_dir: str, mask_id: Optional[int] = None, add_mask_token: bool = False,
                   shift_logits: Optional[bool] = None, attn_implementation: Optional[str] = None,
                   trust_remote_code: bool = False, dtype: str = "float32") -> Tuple[HFBackbone, Any]:
    """(backbone, tokenizer) of a local model directory. ``shift_logits`` None: as ``anyorder.json``
    records, else on for a causal LM (its head predicts the next token: Dream's shift), off for a
    masked LM. ``mask_id`` and ``attn_implementation`` None: as recorded, else found / ``sdpa``."""
    import transformers  # lazy: optional dependency (the 'hf' extra)

    if not Path(model_dir).is_dir():
        raise ValueError(f"--model {model_dir!r} is not a directory: give a local model directory (config.json, "
                         f"weights, tokenizer); download a hub model first with `hf download ID --local-dir DIR`")
    info = read_export_info(model_dir)
    mask_id = info.get("mask_id") if mask_id is None else mask_id
    shift_logits = info.get("shift_logits") if shift_logits is None else shift_logits
    attn_implementation = attn_implementation or info.get("attn_implementation") or "sdpa"
    try:
        transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)  # its error first
    except (OSError, ValueError) as exc:
        raise explain_load_error(exc, model_dir) from None
    try:
        tok = transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--model {model_dir!r} has no loadable tokenizer: {str(exc).splitlines()[0]}") from None
    if mask_id is None:
        mask_id = getattr(tok, "mask_token_id", None)
        mask_id = KNOWN_MASK_IDS.get(str(getattr(tok, "name_or_path", ""))) if mask_id is None else mask_id
    if mask_id is None:
        if not add_mask_token:
            raise ValueError(f"{model_dir!r}: its tokenizer has no mask token; pass --mask-id ID (a token the model "
                             f"was trained to read as [MASK]) or --add-mask-token (a new, untrained [MASK]: "
                             f"fine-tune under an order first)")
        tok.add_special_tokens({"mask_token": "[MASK]"})
        mask_id = tok.mask_token_id
    opts = {"path": str(model_dir), "attn_implementation": attn_implementation, "dtype": dtype,
            "trust_remote_code": trust_remote_code}
    opts["shift_logits"] = bool(shift_logits)  # auto (None): unshifted until the model says otherwise
    model = build_hf_backbone(opts, vocab_size=len(tok), mask_id=int(mask_id))
    if shift_logits is None:  # an AR LM's head predicts the next token (Dream reads it shifted); LLaDA's its own
        model.cfg.shift_logits = model.head_predicts_next_token
    return model.eval(), tok


def generate(model: HFBackbone, tok, prompts: Sequence[str], order="random", decoder="top_prob",
             gen_length: int = 32, seed: int = 0, chat: bool = False) -> List[Dict[str, Any]]:
    """Decode each prompt (one row at a time); per prompt the text, answer token ids, NFE, AFP, τ."""
    if int(gen_length) < 1:
        raise ValueError(f"--gen-length must be >= 1, got {gen_length}")
    order, dec = build_order(order), build_decoder(decoder)
    device = next(model.parameters()).device
    out = []
    for b, prompt in enumerate(prompts):
        ids = generation_prompt_ids(tok, prompt, chat)
        x = torch.tensor([ids + [model.cfg.mask_id] * int(gen_length)], device=device)
        answer = torch.zeros_like(x, dtype=torch.bool)
        answer[:, len(ids):] = True
        with torch.no_grad():
            res = dec.decode(model, order, x, answer, row_seeds=[seed + b])
        tokens = res.tokens[0, len(ids):].tolist()
        out.append({"prompt": prompt, "text": tok.decode(tokens, skip_special_tokens=True), "tokens": tokens,
                    "nfe": int(res.trace.nfe[0]), "afp": float(res.trace.afp()[0]),
                    "kendall_tau": float(res.trace.kendall_tau()[0])})
    return out


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="a local Hugging Face model directory with its tokenizer")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    p.add_argument("--order", default=None, help="an order name or a YAML dict, e.g. '{name: ar, prompt: causal}' "
                   "(default: anyorder.json's, else random)")
    p.add_argument("--decoder", default=None, help="a decoder name or a YAML dict, e.g. '{name: threshold, tau: 0.9}' "
                   "(default: anyorder.json's, else top_prob)")
    p.add_argument("--gen-length", dest="gen_length", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mask-id", dest="mask_id", type=int, default=None)
    p.add_argument("--add-mask-token", dest="add_mask_token", action="store_true")
    p.add_argument("--shift-logits", dest="shift_logits", choices=["auto", "true", "false"], default="auto")
    p.add_argument("--attn-implementation", dest="attn_implementation", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None, help="where the model runs (default: cuda if available, else cpu)")
    p.add_argument("--trust-remote-code", dest="trust_remote_code", action="store_true")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap each prompt with the tokenizer's chat template (default: anyorder.json's, else no)")
    p.add_argument("--json", action="store_true", help="print tokens, NFE, AFP and Kendall tau as JSON")


def run_from_args(args) -> None:
    import json  # lazy: only this command prints JSON here
    from ..config import read_yaml  # lazy: config imports the model package (a cycle at import time)

    shift = {"auto": None, "true": True, "false": False}[args.shift_logits]
    model, tok = load_generator(args.model, args.mask_id, args.add_mask_token, shift, args.attn_implementation,
                                args.trust_remote_code, args.dtype)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise ValueError(f"--device {args.device!r} is not a device: {str(exc).splitlines()[0]}") from None
    model.to(device)
    info = read_export_info(args.model)
    order = info.get("order", "random") if args.order is None else read_yaml(args.order, f"--order {args.order!r}")
    decoder = info.get("decoder", "top_prob") if args.decoder is None else read_yaml(args.decoder, f"--decoder {args.decoder!r}")
    chat = bool(info.get("chat", False)) if args.chat is None else args.chat
    rows = generate(model, tok, args.prompt, order, decoder, args.gen_length, args.seed, chat)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for row in rows:
            print(row["text"])
