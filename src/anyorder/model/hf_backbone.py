"""Any Hugging Face causal or masked LM as an anyorder backbone: trained and decoded under any order.

:class:`HFBackbone` gives a ``transformers`` model (Llama, Qwen2, GPT-2 class, BERT class, ...)
the native backbone's interface (:class:`anyorder.model.Transformer`):

- ``hidden(tokens, attn_mask, positions, extra, t) -> [B, L', D]`` and ``head_logits(h) ->``
  float32 logits with the mask column at -inf; ``forward`` is the two composed;
- the order's boolean mask ``[B, L', L']`` (True = may attend; None = bidirectional, *not* the
  model's own causal default) becomes the 4-D mask ``[B, 1, L', L']`` its attention
  implementation expects: boolean for ``sdpa``, additive (0 / dtype-min) for ``eager``, whose
  kernel *adds* the mask to the scores (a boolean mask would add 0/1 there and silently leave
  every key visible; ``tests/test_hf_backbone.py`` compares with the model's own causal pass);
- ``positions`` go in as ``position_ids`` (two-stream passes repeat positions 0..L-1);
- the task's extra embeddings (Sudoku row/column/box) are added to the token embeddings through
  ``inputs_embeds``; each table starts at zero, so a pretrained model is unchanged at step 0;
- ``shift_logits`` reads position i's logits from hidden state i-1, as Dream (Ye et al., 2025,
  arXiv 2508.15487) does to keep an AR-initialised model's next-token head; it needs one-stream
  passes (a two-stream pass's state i-1 is a masked copy, not x^{i-1}) and is refused there.

``cfg`` carries what the rest of the library reads (``mask_id``, ``vocab_size``,
``time_conditioning=False``, ...). ``forward_cached`` serves the exact KV cache of
model/kv_cache.py (decoding/forward.py decides what runs): the model's attention layers call
``cache.update(k, v, layer)`` on the object they are given, and :class:`SlotKV` answers by
writing the queries' post-RoPE K/V at their slots and returning every slot's K/V, so each layer
attends over the whole sequence under the order's mask. It also keeps every slot's last hidden
state, which shifted logits read at i-1. A model whose attention takes no cache (an encoder
such as BERT) is refused with the fix (``cache: false``).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from ..checks import check_bool, check_choice, check_mapping, show
from .lora import LORA_DEFAULTS, apply_lora, check_lora_options

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
AUTO_CLASSES = ("auto", "causal_lm", "masked_lm")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The model section of a config with ``backbone: hf`` (the keys and their defaults).
HF_DEFAULTS: Dict[str, Any] = {
    "backbone": "hf",
    "path": None,                  # a local directory (or a hub id already in the local cache)
    "from_config": None,           # or a transformers config dict: a randomly initialised model
    "attn_implementation": "sdpa",
    "shift_logits": False,
    "trust_remote_code": False,
    "dtype": "float32",
    "auto_class": "auto",          # auto: masked LM where transformers has one for the type, else causal LM
    "lora": dict(LORA_DEFAULTS),   # r > 0: LoRA adapters (model/lora.py); r: 0 (or null) trains every weight
}


@dataclass
class HFBackboneConfig:
    """The fields of :class:`anyorder.model.ModelConfig` that library code reads off ``model.cfg``."""

    vocab_size: int
    mask_id: int
    d_model: int
    n_layers: int
    n_heads: int
    max_len: int
    shift_logits: bool = False
    attn_implementation: str = "sdpa"
    time_conditioning: bool = False           # HF models take no t; objectives read this flag
    extra_embeddings: Dict[str, int] = field(default_factory=dict)


class HFBackbone(nn.Module):
    """A ``transformers`` LM behind ``hidden`` / ``head_logits`` / ``forward`` (see the module doc)."""

    def __init__(self, hf: nn.Module, mask_id: int, extra_embeddings: Optional[Dict[str, int]] = None,
                 shift_logits: bool = False):
        super().__init__()
        conf = hf.config
        impl = getattr(conf, "_attn_implementation", None)
        if impl not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"model.attn_implementation {impl!r} cannot run an order's attention mask; "
                             f"valid choices: {', '.join(ATTN_IMPLEMENTATIONS)}")
        self.hf = hf
        self.base_name = hf.base_model_prefix
        self.bind(hf)
        vocab = hf.get_input_embeddings().num_embeddings
        if not 0 <= int(mask_id) < vocab:
            raise ValueError(f"mask id {mask_id} is outside the model's vocabulary of size {vocab}")
        d = int(conf.hidden_size)
        extra = dict(extra_embeddings or {})
        self.extra = nn.ModuleDict({k: nn.Embedding(int(n), d) for k, n in extra.items()})
        for emb in self.extra.values():  # zero: a pretrained model computes exactly what it did
            nn.init.zeros_(emb.weight)
        max_len = int(getattr(conf, "max_position_embeddings", None) or getattr(conf, "max_sequence_length", None)
                      or 2 ** 31 - 1)
        self.cfg = HFBackboneConfig(vocab, int(mask_id), d, int(conf.num_hidden_layers), int(conf.num_attention_heads),
                                    max_len, bool(shift_logits), impl, extra_embeddings=extra)

    def set_gradient_checkpointing(self, on: bool = True) -> None:
        """Recompute each layer's activations in the backward pass (train/recompute.py), through the
        model's own ``gradient_checkpointing_enable``; a model without support is a one-line error."""
        # transformers 5 renamed it activation checkpointing; 4.x (LLaDA's remote code) has the old name
        prefix = "activation" if hasattr(self.hf, "activation_checkpointing_enable") else "gradient"
        if not on:
            getattr(self.hf, f"{prefix}_checkpointing_disable")()
        elif not getattr(self.hf, "supports_gradient_checkpointing", False):
            raise ValueError(f"train.gradient_checkpointing=true: {type(self.hf).__name__} does not support "
                             f"gradient checkpointing; set train.gradient_checkpointing=false")
        else:
            getattr(self.hf, f"{prefix}_checkpointing_enable")(**{f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}})

    @property
    def head_predicts_next_token(self) -> bool:
        """Whether the pretrained head predicts the token after its position (an AR LM, read shifted
        as Dream does) rather than its own (a masked LM): what ``shift_logits: auto`` follows."""
        names = [type(self.hf).__name__] + list(getattr(self.hf.config, "architectures", None) or [])
        return not any(a.endswith("ForMaskedLM") for a in names)

    def bind(self, hf: nn.Module) -> None:
        """Find the output head beside the base model (the *ForCausalLM / *ForMaskedLM layout)."""
        heads = [n for n, _ in hf.named_children() if n != self.base_name]
        if not hasattr(hf, self.base_name) or len(heads) != 1:
            raise ValueError(f"{type(hf).__name__} is not a base model plus one output head "
                             f"(children: {[n for n, _ in hf.named_children()]}); wrap a *ForCausalLM or *ForMaskedLM")
        self.head_name = heads[0]
        # transformers 5.x names the base model's cache argument ``cache`` (``past_key_values`` before)
        self.cache_kw = "cache" if "cache" in inspect.signature(self.base.forward).parameters else "past_key_values"

    @property
    def base(self) -> nn.Module:
        return getattr(self.hf, self.base_name)

    def shard_units(self):
        """The modules FSDP shards one by one (train/fsdp.py): the layers the model names as never to be
        split (``_no_split_modules``), else the members of its longest ModuleList (the layer stack)."""
        kinds = set(getattr(self.hf, "_no_split_modules", None) or ())
        units = [m for m in self.hf.modules() if type(m).__name__ in kinds]
        stacks = [m for m in self.hf.modules() if isinstance(m, nn.ModuleList)]
        return units or (list(max(stacks, key=len)) if stacks else [])

    def attention_mask(self, attn_mask: Optional[torch.Tensor], B: int, L: int, dtype, device,
                       keys: Optional[int] = None) -> torch.Tensor:
        """The order's [B, L, keys] bool mask (None: all visible) as this implementation's 4-D mask."""
        allow = allowed(attn_mask, B, L, L if keys is None else keys, device)
        return allow if self.cfg.attn_implementation == "sdpa" else additive(allow, dtype)  # eager adds it

    def embed(self, tokens: torch.Tensor, extra: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        B, L = tokens.shape
        h = self.hf.get_input_embeddings()(tokens)
        for name, ids in (extra or {}).items():
            if name not in self.extra:
                raise ValueError(f"extra embedding {name!r} not in this backbone's {list(self.extra)}")
            ids = ids if ids.dim() == 2 else ids.unsqueeze(0).expand(B, L)
            h = h + self.extra[name](ids.to(tokens.device)).to(h.dtype)
        return h

    def hidden(self, tokens, attn_mask=None, positions=None, extra=None, t=None) -> torch.Tensor:
        """Final hidden states [B, L', D] of the base model under the order's mask (with
        ``shift_logits``, row i holds state i-1)."""
        B, L = tokens.shape
        if positions is None:
            positions = torch.arange(L, device=tokens.device)
        positions = (positions if positions.dim() == 2 else positions.unsqueeze(0)).expand(B, L).to(tokens.device)
        top = int(positions.max()) if positions.numel() else 0
        if top >= self.cfg.max_len:
            raise ValueError(f"position {top} exceeds the model's max_position_embeddings={self.cfg.max_len}")
        if self.cfg.shift_logits and top + 1 < L:
            raise ValueError("model.shift_logits=true reads position i from hidden state i-1, which a two-stream "
                             "training pass (ar, block, jigsaw) does not hold: train with an order of one stream "
                             "(random, scatter, prefix_block) or set model.shift_logits=false")
        h = self.embed(tokens, extra)
        mask = self.attention_mask(attn_mask, B, L, h.dtype, h.device)
        out = self.base(inputs_embeds=h, attention_mask=mask, position_ids=positions, use_cache=False)
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if self.cfg.shift_logits:  # Dream: position i reads state i-1; position 0 keeps its own
            h = torch.cat([h[:, :1], h[:, :-1]], dim=1)  # (here, so head_logits may take any rows)
        return h

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """float32 logits [..., V] of hidden states; the mask column is -inf (MDLM's zero-masking)."""
        raw = self.raw_logits(h)
        logits = raw.float()
        if logits.data_ptr() == raw.data_ptr():   # float32 already: copy before writing -inf into it
            logits = logits.clone()
        logits[..., self.cfg.mask_id] = float("-inf")
        return logits

    def raw_logits(self, h: torch.Tensor) -> torch.Tensor:
        return getattr(self.hf, self.head_name)(h)

    def forward(self, tokens, attn_mask=None, positions=None, extra=None, t=None) -> torch.Tensor:
        return self.head_logits(self.hidden(tokens, attn_mask, positions, extra, t))

    def forward_cached(self, tokens, positions, cache, slots, attn_mask, extra=None, t=None) -> torch.Tensor:
        """Logits [B, Q, V] of the query tokens only: :meth:`head_logits` of :meth:`hidden_cached`."""
        return self.head_logits(self.hidden_cached(tokens, positions, cache, slots, attn_mask, extra, t))

    def hidden_cached(self, tokens, positions, cache, slots, attn_mask, extra=None, t=None) -> torch.Tensor:
        """Final hidden states [B, Q, D] of the query tokens only (the contract of
        Transformer.hidden_cached; with ``shift_logits``, row i holds state i-1): ``positions``
        [B, Q] their sequence positions, ``slots`` [B, Q] where their K/V go in ``cache`` (the
        scratch slot for padding queries), ``attn_mask`` [B, Q, L + 1] over slots."""
        B, Q = tokens.shape
        kv = cache.__dict__.get("hf_slots")
        if kv is None:
            kv = cache.__dict__["hf_slots"] = SlotKV(cache.length + 1)
        h = self.embed(tokens, extra)
        mask = self.attention_mask(attn_mask, B, Q, h.dtype, h.device, keys=cache.length + 1)
        kv.slots, kv.calls = slots, 0
        out = self.base(inputs_embeds=h, attention_mask=mask, position_ids=positions, use_cache=True,
                        **{self.cache_kw: kv})
        if kv.calls != self.cfg.n_layers:
            raise ValueError(f"{type(self.hf).__name__}'s attention does not use a KV cache (an encoder): decode "
                             f"with cache: false")
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if kv.hidden is None:
            kv.hidden = torch.zeros(B, cache.length + 1, h.shape[-1], dtype=h.dtype, device=h.device)
        kv.hidden.scatter_(1, slots.unsqueeze(-1).expand_as(h), h)
        if self.cfg.shift_logits:  # state i-1: computed now or kept exact by the cache (else refuse)
            prev = (positions - 1).clamp_min(0)
            real = slots < cache.length
            n = cache.length           # padding queries write their False into the scratch slot n
            here = torch.zeros(B, n + 1, dtype=torch.bool, device=h.device).scatter_(1, slots, real)[:, :n]
            ok = (cache.stored | here).gather(1, prev) | (positions == 0) | ~real
            if not bool(ok.all()):
                raise ValueError("shift_logits reads state i-1, which this order neither caches nor recomputes "
                                 "with i: decode with cache: false")
            h = torch.where((positions == 0).unsqueeze(-1), h, kv.hidden.gather(1, prev.unsqueeze(-1).expand_as(h)))
        return h


def allowed(attn_mask: Optional[torch.Tensor], B: int, L: int, keys: int, device) -> torch.Tensor:
    """An order's [B, L, keys] bool mask (None: all visible) as [B, 1, L, keys], True = may attend."""
    if attn_mask is None:
        return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device).expand(B, 1, L, keys)
    allow = attn_mask.to(device=device, dtype=torch.bool)
    return (allow.unsqueeze(1) if allow.dim() == 3 else allow).expand(B, 1, L, keys)


def additive(allow: torch.Tensor, dtype) -> torch.Tensor:
    """A bool mask as the bias a kernel *adds* to its scores: 0 where allowed, the dtype's minimum
    where not (a bool mask added there would be 0/1 and leave every key visible)."""
    zero = torch.zeros((), dtype=dtype, device=allow.device)
    return torch.where(allow, zero, torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allow.device))


class SlotKV:
    """What a Hugging Face attention layer takes as its cache: ``update(k, v, layer)`` writes the
    queries' K/V [B, H_kv, Q, hd] at their slots in per-layer buffers [B, H_kv, L + 1, hd] and
    returns the whole buffers (position-indexed, as model/kv_cache.py lays them out)."""

    def __init__(self, n_slots: int):
        self.n_slots, self.k, self.v = n_slots, [], []
        self.slots: Optional[torch.Tensor] = None
        self.hidden: Optional[torch.Tensor] = None   # [B, L + 1, D] last hidden state of every slot
        self.calls = 0

    def select_rows(self, rows: torch.Tensor) -> "SlotKV":
        """A copy of batch rows ``rows`` (model/kv_cache.KVCache.select)."""
        sub = SlotKV(self.n_slots)
        sub.k, sub.v = [t.index_select(0, rows) for t in self.k], [t.index_select(0, rows) for t in self.v]
        sub.hidden = None if self.hidden is None else self.hidden.index_select(0, rows)
        return sub

    def put_rows(self, rows: torch.Tensor, sub: "SlotKV") -> None:
        """Write ``sub`` (:meth:`select_rows` of ``rows``, since run) back into those rows. This
        cache must hold every buffer ``sub`` does (a decode's first pass runs every row): rows
        put into buffers that do not exist yet would be lost, so that is an error, not a no-op."""
        if len(self.k) != len(sub.k) or (sub.hidden is not None and self.hidden is None):
            raise RuntimeError("SlotKV.put_rows: this cache has not run every layer on every row yet (a decode's "
                               "first pass must run all rows before a pass runs some of them)")
        for mine, theirs in zip(self.k + self.v, sub.k + sub.v):
            mine.index_copy_(0, rows, theirs)
        if sub.hidden is not None:
            self.hidden.index_copy_(0, rows, sub.hidden)

    def get_seq_length(self, *args, **kwargs) -> int:
        return 0   # no implicit past: every query's position is given explicitly

    def update(self, key, value, layer_idx, *args, **kwargs):
        if layer_idx == len(self.k):
            B, H, _, hd = key.shape
            self.k.append(torch.zeros(B, H, self.n_slots, hd, dtype=key.dtype, device=key.device))
            self.v.append(torch.zeros(B, H, self.n_slots, value.shape[-1], dtype=value.dtype, device=value.device))
        idx = self.slots.view(key.shape[0], 1, -1, 1)
        self.k[layer_idx].scatter_(2, idx.expand_as(key), key)
        self.v[layer_idx].scatter_(2, idx.expand_as(value), value)
        self.calls += 1
        return self.k[layer_idx], self.v[layer_idx]


# -- building ------------------------------------------------------------------------------------
def _model_class(transformers, config, auto_class: str):
    """AutoModelForMaskedLM or AutoModelForCausalLM: as asked, else as the saved architecture
    says, else masked where transformers has a masked LM for the model type (BERT), else causal."""
    masked = auto_class == "masked_lm"
    if auto_class == "auto":
        names = getattr(config, "architectures", None) or []
        masked = names[0].endswith("ForMaskedLM") if names else type(config) in transformers.MODEL_FOR_MASKED_LM_MAPPING
    return transformers.AutoModelForMaskedLM if masked else transformers.AutoModelForCausalLM


def check_hf_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """The model section with defaults filled in and every value checked (one-line ValueErrors)."""
    unknown = sorted(set(check_mapping("model", options)) - set(HF_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown model option(s) {', '.join(unknown)} for backbone 'hf'. "
                         f"Valid options: {', '.join(HF_DEFAULTS)}")
    opts = {**HF_DEFAULTS, **options}
    if (opts["path"] is None) == (opts["from_config"] is None):
        raise ValueError(f"backbone 'hf' needs exactly one of model.path (a model directory) and model.from_config "
                         f"(a transformers config dict), got path={show(opts['path'])}, "
                         f"from_config={show(opts['from_config'])}")
    if opts["path"] is not None and (not isinstance(opts["path"], str) or not opts["path"].strip()):
        raise ValueError(f"model.path must be a directory or hub id, got {show(opts['path'])}")
    if opts["from_config"] is not None and "model_type" not in check_mapping("model.from_config", opts["from_config"]):
        raise ValueError(f"model.from_config needs a 'model_type' (e.g. llama, qwen2, bert), got {show(opts['from_config'])}")
    check_choice("model.attn_implementation", opts["attn_implementation"], ATTN_IMPLEMENTATIONS)
    check_choice("model.dtype", opts["dtype"], DTYPES)
    check_choice("model.auto_class", opts["auto_class"], AUTO_CLASSES)
    for key in ("shift_logits", "trust_remote_code"):
        check_bool(f"model.{key}", opts[key])
    if opts["lora"] is not None:
        opts["lora"] = check_lora_options(opts["lora"])
    return opts


def load_hf(opts: Dict[str, Any], vocab_size: Optional[int] = None, max_len: Optional[int] = None):
    """The bare ``transformers`` model of checked options (weights only when not on the meta device)."""
    import transformers  # lazy: optional dependency (the 'hf' extra)

    kw = {"attn_implementation": opts["attn_implementation"], "dtype": DTYPES[opts["dtype"]],
          "trust_remote_code": opts["trust_remote_code"]}
    if opts["from_config"] is not None:
        spec = dict(opts["from_config"])
        if vocab_size is not None:
            spec["vocab_size"] = int(vocab_size)
        config = transformers.AutoConfig.for_model(spec.pop("model_type"), **spec)
        if max_len is not None and int(getattr(config, "max_position_embeddings", max_len)) < max_len:
            config.max_position_embeddings = int(max_len)  # the task's length must have positions
        return _model_class(transformers, config, opts["auto_class"]).from_config(config, **kw)
    path = opts["path"]
    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=opts["trust_remote_code"])
        cls = _model_class(transformers, config, opts["auto_class"])
        if torch.empty(()).device.type == "meta":  # sizing only (checks.check_size): no weights read
            return cls.from_config(config, **kw)
        return cls.from_pretrained(path, **kw)
    except (OSError, ValueError) as exc:
        raise explain_load_error(exc, path) from None


def explain_load_error(exc: Exception, path: str) -> ValueError:
    """A one-line error naming the fix for a model that transformers could not load."""
    text = str(exc)
    if "trust_remote_code" in text:
        return ValueError(f"model.path {path!r} runs custom code from its directory: set model.trust_remote_code=true "
                          f"(anyorder generate: --trust-remote-code) only if you trust that code")
    if "does not support an attention implementation" in text:  # remote code with its own attention (LLaDA)
        return ValueError(f"model.path {path!r}: its code runs its own attention and refuses transformers' "
                          f"'sdpa' flag: set model.attn_implementation=eager (generate: --attn-implementation eager)")
    if not Path(path).is_dir():
        return ValueError(f"model.path {path!r} is not a model directory here and not in the local Hugging Face "
                          f"cache (nothing is downloaded: HF_HUB_OFFLINE): download it first "
                          f"(`hf download {path} --local-dir DIR`) and pass model.path=DIR")
    return ValueError(f"model.path {path!r} holds no loadable model: {text.splitlines()[0] if text else type(exc).__name__}")


def build_hf_backbone(options: Dict[str, Any], vocab_size: Optional[int] = None, mask_id: Optional[int] = None,
                      max_len: Optional[int] = None, extra_embeddings: Optional[Dict[str, int]] = None) -> HFBackbone:
    """The backbone of a config's model section for a task with this vocabulary and mask id (the
    task's ids are the model's: a model with fewer embedding rows is resized to ``vocab_size``)."""
    opts = check_hf_options(options)
    hf = load_hf(opts, vocab_size, max_len)
    if vocab_size is not None and hf.get_input_embeddings().num_embeddings < int(vocab_size):
        hf.resize_token_embeddings(int(vocab_size))
    if mask_id is None:
        raise ValueError("backbone 'hf' needs a mask id (the task's, or the tokenizer's: see anyorder.adapters.hf_generate)")
    model = wrap_hf(hf, int(mask_id), extra_embeddings, opts["shift_logits"])
    return apply_lora(model, opts["lora"]) if opts["lora"] is not None and opts["lora"]["r"] > 0 else model


def wrap_hf(hf: nn.Module, mask_id: int, extra_embeddings: Optional[Dict[str, int]] = None,
            shift_logits: bool = False) -> HFBackbone:
    """The backbone class that reads this model's layout, chosen by what its forward takes: a
    base model taking ``attention_bias`` and no positions (LLaDA) or the *ForCausalLM / *ForMaskedLM one."""
    from .hf_llada import BiasBackbone  # lazy: it subclasses HFBackbone (an import cycle at module level)

    cls = BiasBackbone if BiasBackbone.fits(hf) else HFBackbone
    return cls(hf, int(mask_id), extra_embeddings, shift_logits)
