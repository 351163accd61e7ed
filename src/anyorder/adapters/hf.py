"""Decode a Hugging Face masked-diffusion LM (LLaDA, Dream, ...) with anyorder's decoders.

anyorder's decoding loop calls ``model(x, attn_mask=..., extra=...)`` and reads
``model.cfg.mask_id``. :class:`HFMaskedDiffusionLM` gives a Hugging Face model exactly that
interface, so every decoder, order rule, trace and diagnostic here runs on it unchanged:

- logits are read as ``model(input_ids).logits`` (a plain tuple output's first element works too);
- ``shift_logits=True`` applies the shift ``cat(logits[:, :1], logits[:, :-1])`` of Dream
  (Ye et al., 2025, arXiv 2508.15487) and MGDM (Ye et al., 2024, arXiv 2410.14157): those
  models are AR-initialised and predict token i from hidden state i-1;
- the mask column is set to -inf (and, with ``vocab_limit``, the padded ids of an embedding
  table larger than the tokenizer), so a decoder can never commit [MASK];
- logits come back as float32 on the device of the ``tokens`` the caller passed: the decoding
  loop and its per-row generators live on the CPU, the network may live on a GPU.

Attention (``attention=``):
  ``"full"``   the model's own attention, which for LLaDA/Dream is bidirectional. Only orders
               that ask for no restriction (``attn_mask`` None or all True) can run: ``random``
               with any decoder, semi-AR windows (``decoder.window``) and the
               ``left_to_right`` score included. A restrictive mask raises a ValueError.
  ``"mask4d"`` every forward passes an explicit additive 4-D ``attention_mask`` [B, 1, L, L]
               (0 = attend, dtype-min = blocked), all zeros when the order has no mask, so the
               order's exact attention is honoured and a causal-by-default architecture (Llama,
               GPT-2 style) becomes bidirectional. Needs a model whose forward accepts custom
               4-D masks: tested with transformers 5.23's BERT and Llama.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..decoding import build_decoder
from ..orders import build_order

ATTENTION_MODES = ("full", "mask4d")
AUTO_CLASSES = ("AutoModel", "AutoModelForMaskedLM", "AutoModelForCausalLM")
# Mask ids of the public checkpoints this adapter is written for (their tokenizers may not say).
KNOWN_MASK_IDS = {"GSAI-ML/LLaDA-8B-Instruct": 126336, "GSAI-ML/LLaDA-8B-Base": 126336,
                  "Dream-org/Dream-v0-Instruct-7B": 151666, "Dream-org/Dream-v0-Base-7B": 151666}


@dataclass
class HFAdapterConfig:
    """The fields of :class:`anyorder.model.ModelConfig` that library code reads off ``model.cfg``."""

    vocab_size: int
    mask_id: int
    shift_logits: bool = False
    attention: str = "full"
    vocab_limit: Optional[int] = None
    time_conditioning: bool = False          # HF MDLMs take no t; objectives read this flag
    extra_embeddings: Dict[str, int] = field(default_factory=dict)


class HFMaskedDiffusionLM(nn.Module):
    """A Hugging Face model behind anyorder's ``forward(tokens, attn_mask, positions, extra, t)``."""

    def __init__(self, hf_model: nn.Module, mask_token_id: int, shift_logits: bool = False,
                 attention: str = "full", vocab_limit: Optional[int] = None, vocab_size: Optional[int] = None):
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ValueError(f"unknown attention mode {attention!r}. Valid choices: {', '.join(ATTENTION_MODES)}")
        if vocab_size is None:
            vocab_size = getattr(getattr(hf_model, "config", None), "vocab_size", None)
        if vocab_size is None:
            raise ValueError("cannot read vocab_size from the model's config: pass vocab_size=")
        if mask_token_id is None or not 0 <= int(mask_token_id) < int(vocab_size):
            raise ValueError(f"mask_token_id {mask_token_id} is outside the vocabulary of size {vocab_size}")
        if vocab_limit is not None and not int(mask_token_id) < int(vocab_limit) <= int(vocab_size):
            raise ValueError(f"vocab_limit must lie in ({mask_token_id}, {vocab_size}], got {vocab_limit}")
        self.hf = hf_model
        self.cfg = HFAdapterConfig(int(vocab_size), int(mask_token_id), bool(shift_logits), attention,
                                   None if vocab_limit is None else int(vocab_limit))

    @property
    def device(self) -> torch.device:
        p = next(self.hf.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.hf.parameters(), None)
        return p.dtype if p is not None and p.is_floating_point() else torch.float32

    def _attention_kwargs(self, attn_mask: Optional[torch.Tensor], B: int, L: int) -> dict:
        if self.cfg.attention == "full":
            if attn_mask is not None and not bool(attn_mask.all()):
                raise ValueError(
                    "this Hugging Face model is wrapped with attention='full' (its own bidirectional "
                    "attention), but the order asks for a restrictive attention mask. Decode with order "
                    "'random' (any decoder; semi-AR via decoder.window, left to right via the "
                    "'left_to_right' decoder), or wrap with attention='mask4d' if the model's forward "
                    "accepts a 4-D attention_mask.")
            return {}
        allow = torch.ones(B, 1, L, L, dtype=torch.bool) if attn_mask is None else attn_mask.bool()
        if allow.dim() == 3:
            allow = allow.unsqueeze(1)             # [B, 1, Lq, Lk]: one mask for every head
        # Additive float masks are the 4-D format transformers has accepted longest (bool ones are newer).
        add = torch.zeros(allow.shape, dtype=self.dtype, device=self.device)
        return {"attention_mask": add.masked_fill(~allow.to(self.device), torch.finfo(self.dtype).min)}

    def forward(self, tokens: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None, extra: Optional[dict] = None,
                t: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, L, V] float32 on ``tokens.device``; the mask column (and ids >= vocab_limit) = -inf."""
        B, L = tokens.shape
        if extra:
            raise ValueError(f"a Hugging Face model takes no extra embeddings, got {sorted(extra)}")
        if t is not None:
            raise ValueError("a Hugging Face masked-diffusion LM is not time-conditioned: pass t=None")
        if positions is not None and not bool((positions.cpu() == torch.arange(L)).all()):
            # Position ids are not a uniform kwarg across remote-code models (LLaDA takes none).
            raise ValueError("the Hugging Face adapter runs positions 0..L-1 only (no custom positions)")
        kwargs = self._attention_kwargs(attn_mask, B, L)
        out = self.hf(input_ids=tokens.to(self.device), **kwargs)
        raw = out.logits if hasattr(out, "logits") else out[0]
        logits = raw.float()
        if self.cfg.shift_logits:
            # Dream/MGDM: position i is predicted from hidden state i-1; position 0 keeps its own row.
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        if logits.shape[-1] != self.cfg.vocab_size:
            raise ValueError(f"model returned {logits.shape[-1]} logits per position, config says "
                             f"vocab_size={self.cfg.vocab_size}")
        if logits.data_ptr() == raw.data_ptr():    # float32 already: copy before writing -inf into it
            logits = logits.clone()
        if self.cfg.vocab_limit is not None:
            logits[..., self.cfg.vocab_limit:] = float("-inf")
        logits[..., self.cfg.mask_id] = float("-inf")
        return logits.to(tokens.device)


# -- loading ---------------------------------------------------------------------------------
def _dtype(name):
    if name is None or isinstance(name, torch.dtype) or name == "auto":
        return name
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if name not in names:
        raise ValueError(f"unknown dtype {name!r}. Valid choices: auto, {', '.join(names)}")
    return names[name]


def load_hf_model(name_or_path: str, mask_token_id: Optional[int] = None, shift_logits: bool = False,
                  trust_remote_code: bool = False, torch_dtype="auto", device: str = "cpu",
                  attention: str = "full", auto_class: str = "AutoModel", vocab_limit: Optional[int] = None,
                  load_tokenizer: bool = True) -> Tuple[HFMaskedDiffusionLM, object]:
    """Load a masked-diffusion LM and its tokenizer from the Hub or a local directory.

    ``mask_token_id``: default the known id of a public checkpoint (LLaDA 126336, Dream 151666),
    else the tokenizer's ``mask_token_id``. ``torch_dtype``: "auto", "bf16", "fp16", "fp32" or a
    torch dtype. ``auto_class``: LLaDA and Dream load with ``AutoModel`` (their remote code maps it
    to the LM-head class); a stock masked LM such as BERT needs ``AutoModelForMaskedLM``.
    Returns ``(model, tokenizer)`` (tokenizer None with ``load_tokenizer=False``).
    """
    import transformers  # lazy: optional dependency (the 'hf' extra)
    from packaging.version import Version  # lazy: installed with transformers, only needed with it

    if auto_class not in AUTO_CLASSES:
        raise ValueError(f"unknown auto_class {auto_class!r}. Valid choices: {', '.join(AUTO_CLASSES)}")
    if attention not in ATTENTION_MODES:
        raise ValueError(f"unknown attention mode {attention!r}. Valid choices: {', '.join(ATTENTION_MODES)}")
    tok = None
    if load_tokenizer:
        tok = transformers.AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if mask_token_id is None:  # a known checkpoint's id first: its tokenizer may name another mask token
        mask_token_id = KNOWN_MASK_IDS.get(name_or_path)
        if mask_token_id is None and tok is not None:
            mask_token_id = getattr(tok, "mask_token_id", None)
        if mask_token_id is None:
            raise ValueError(f"no mask token id for {name_or_path!r}: pass mask_token_id= "
                             f"(LLaDA: 126336, Dream: 151666)")
    # transformers renamed from_pretrained's torch_dtype to dtype in 4.56; older versions would
    # silently hand an unknown ``dtype`` kwarg to the config, so pick the name by version.
    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    cls = getattr(transformers, auto_class)
    hf = cls.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **{key: _dtype(torch_dtype)})
    hf = hf.to(device).eval()
    model = HFMaskedDiffusionLM(hf, mask_token_id, shift_logits=shift_logits, attention=attention,
                                vocab_limit=vocab_limit)
    return model, tok


# -- prompts -----------------------------------------------------------------------------------
def prompt_ids(tokenizer, prompt: str, chat: bool = False, add_special_tokens: Optional[bool] = None) -> List[int]:
    """Token ids of one prompt; ``chat=True`` wraps it as a user turn with the tokenizer's chat
    template and the assistant's generation prompt (what LLaDA-/Dream-Instruct expect)."""
    if chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               tokenize=False)
    kw = {} if add_special_tokens is None else {"add_special_tokens": bool(add_special_tokens)}
    return list(tokenizer(prompt, **kw)["input_ids"])


def masked_batch(prompts: Sequence[Sequence[int]], gen_length: int, mask_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x = prompt ⊕ [MASK] * gen_length`` per row and the answer mask, for prompts of equal token
    length. Unequal lengths are refused rather than padded: pad tokens would be attended to and a
    row would decode differently in a batch than alone (group prompts by length instead)."""
    lengths = {len(p) for p in prompts}
    if len(lengths) != 1:
        raise ValueError(f"prompts in one batch must have the same token length, got lengths {sorted(lengths)}; "
                         "group them by length (anyorder.adapters.lm_eval does) or decode one at a time")
    if int(gen_length) < 1:
        raise ValueError(f"gen_length must be >= 1, got {gen_length}")
    P = lengths.pop()
    x = torch.full((len(prompts), P + int(gen_length)), int(mask_id), dtype=torch.long)
    x[:, :P] = torch.tensor([list(p) for p in prompts], dtype=torch.long).reshape(len(prompts), P)
    answer = torch.zeros_like(x, dtype=torch.bool)
    answer[:, P:] = True
    return x, answer


def generate(model, tokenizer, prompts: Sequence[str], gen_length: int = 128, decoder="top_prob",
             order="random", chat: bool = False, seed: int = 0, skip_special_tokens: bool = True):
    """Decode equal-length prompts in one batch. Returns ``(texts, DecodeResult)``.

    Row b samples with seed ``seed + b``; texts are the decoded answers (special tokens skipped)."""
    ids = [prompt_ids(tokenizer, p, chat=chat) for p in prompts]
    x, answer = masked_batch(ids, gen_length, model.cfg.mask_id)
    res = build_decoder(decoder).decode(model, build_order(order), x, answer, row_seeds=[seed + b for b in range(len(ids))])
    texts = [tokenizer.decode(res.tokens[b][answer[b]].tolist(), skip_special_tokens=skip_special_tokens)
             for b in range(len(ids))]
    return texts, res
