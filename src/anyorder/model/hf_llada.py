"""A Hugging Face model whose base takes an additive ``attention_bias`` and no position ids
(LLaDA's published remote code, Nie et al., 2025, arXiv 2502.09992) as an anyorder backbone.

That layout differs from the *ForCausalLM one :class:`~anyorder.model.hf_backbone.HFBackbone`
reads, so :class:`BiasBackbone` overrides only where it differs; the layout is recognised by
capability (:meth:`BiasBackbone.fits`: the base model's ``forward`` takes ``attention_bias``
and ``input_embeddings`` and no ``position_ids``), not by the model's name:

- the output head lives inside the base model (``transformer.ff_out``, or the input embedding
  table when ``weight_tying``), not beside it: the wrapper has one child, the base;
- the order's boolean mask ``[B, L', L']`` goes in as ``attention_bias`` ``[B, 1, L', L']``,
  which the model *adds* to its attention scores: 0 where a query may attend, float32's minimum
  where not (the model's own conversion of a bool bias); ``attention_mask`` there is 2-D padding
  and is not used;
- no position ids: the model rotates queries and keys at 0..L'-1 (RoPE, Su et al., 2021,
  arXiv 2104.09864). Only passes whose slots sit at 0..L'-1 in order can run -- one-stream
  orders (``random``, ``prefix_block``, ``jigsaw``, ``scatter``); a two-stream training pass
  (``ar``, ``block``, teacher-forced ``jigsaw``) repeats positions 0..L-1 in a second copy and is
  refused with the fix;
- the task's extra embeddings are added to the token embeddings and passed as
  ``input_embeddings``;
- no KV cache: the model asserts it takes none, and anyorder's caches (exact and approximate,
  decoding/approx_cache.py) run queries at given positions against stored K/V, which this
  forward cannot express; decoding refuses ``cache`` with the fix.

The base model computes its own logits too; ``hidden`` reads the final hidden state (after
``ln_f``) from ``output_hidden_states`` so that ``head_logits`` can run the head on any rows
(the objectives' lean loss). The base's logits are dropped unused: one extra head matmul per
pass (V x D against the model's ~12 x L x D^2; about 6 % of LLaDA-8B's forward FLOPs).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hf_backbone import HFBackbone, additive, allowed

TWO_STREAM_FIX = ("train it with a one-stream order (random, prefix_block, scatter, jigsaw without teacher "
                  "forcing) or use a model that takes position ids")


class BiasBackbone(HFBackbone):
    """:class:`HFBackbone` for a base model that takes ``attention_bias`` and no positions (module doc)."""

    @staticmethod
    def fits(hf: nn.Module) -> bool:
        base = getattr(hf, getattr(hf, "base_model_prefix", "") or "", None)
        if not isinstance(base, nn.Module):
            return False
        params = inspect.signature(base.forward).parameters
        return "attention_bias" in params and "input_embeddings" in params and "position_ids" not in params

    @property
    def head_predicts_next_token(self) -> bool:
        return False  # a masked-diffusion model (LLaDA): position i's logits predict token i

    def bind(self, hf: nn.Module) -> None:
        body = getattr(self.base, "transformer", None)
        missing = [k for k in ("wte", "blocks", "ln_f") if body is None or k not in body]
        if missing:
            raise ValueError(f"{type(hf).__name__} takes attention_bias but its base model has no transformer."
                             f"{'/'.join(missing)}: not the LLaDA layout this backbone reads")
        self.head_name, self.cache_kw = None, None

    @property
    def body(self) -> nn.Module:
        return self.base.transformer

    def attention_mask(self, attn_mask, B, L, dtype, device, keys=None) -> torch.Tensor:
        # the model adds attention_bias to float32 scores (it casts the bias itself)
        return additive(allowed(attn_mask, B, L, L if keys is None else keys, device), torch.float32)

    def hidden(self, tokens, attn_mask=None, positions=None, extra=None, t=None) -> torch.Tensor:
        """Final hidden states [B, L', D] (after ``ln_f``) under the order's mask."""
        B, L = tokens.shape
        if L > self.cfg.max_len:
            raise ValueError(f"sequence length {L} exceeds the model's max_sequence_length={self.cfg.max_len}")
        if positions is not None:
            pos = positions.to(tokens.device)
            expect = torch.arange(L, device=tokens.device)
            if pos.shape[-1] != L or not bool((pos == expect).all()):
                raise ValueError(f"{type(self.hf).__name__} takes no position ids (RoPE at 0..L-1), but this pass "
                                 f"puts its {L} slots at other positions (a two-stream pass of ar / block): "
                                 f"{TWO_STREAM_FIX}")
        h = self.embed(tokens, extra)
        bias = self.attention_mask(attn_mask, B, L, h.dtype, h.device)
        out = self.base(input_ids=tokens, input_embeddings=h, attention_bias=bias, use_cache=False,
                        output_hidden_states=True)
        h = out.hidden_states[-1]
        if self.cfg.shift_logits:  # Dream's shift, as HFBackbone.hidden (one stream always holds here)
            h = torch.cat([h[:, :1], h[:, :-1]], dim=1)
        return h

    def raw_logits(self, h: torch.Tensor) -> torch.Tensor:
        conf = self.hf.config
        if getattr(conf, "weight_tying", False):
            logits = F.linear(h, self.hf.get_input_embeddings().weight)
        else:
            logits = self.body.ff_out(h)
        if getattr(conf, "scale_logits", False):
            logits = logits / float(conf.d_model) ** 0.5
        return logits

    def hidden_cached(self, tokens, positions, cache, slots, attn_mask, extra=None, t=None) -> torch.Tensor:
        raise ValueError(f"{type(self.hf).__name__} takes no KV cache and no position ids (its forward runs the "
                         f"whole sequence at 0..L-1): decode with cache: false")
