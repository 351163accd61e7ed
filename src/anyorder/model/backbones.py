"""Backbones by name: which network a config's ``model`` section builds (``model.backbone``).

``native`` (the default when a section names none) is :class:`anyorder.model.Transformer`;
``hf`` wraps a Hugging Face causal or masked LM (:mod:`anyorder.model.hf_backbone`). An
objective builds its network with :func:`build_backbone` and the task's vocabulary, mask id,
length and extra embeddings, so no wiring asks which backbone it holds.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

from ..registry import unknown_choice
from .hf_backbone import HF_DEFAULTS, build_hf_backbone
from .transformer import ModelConfig, Transformer


def _native(options, vocab_size, mask_id, max_len, extra_embeddings):
    return Transformer(ModelConfig(vocab_size=vocab_size, mask_id=mask_id, max_len=max_len,
                                   extra_embeddings=dict(extra_embeddings or {}), **options))


def _hf(options, vocab_size, mask_id, max_len, extra_embeddings):
    return build_hf_backbone(options, vocab_size, mask_id, max_len, extra_embeddings)


# name -> (the section's keys and defaults, or None for the config's own model defaults; builder)
BACKBONES: Dict[str, Tuple[Optional[Dict[str, Any]], Callable]] = {
    "native": (None, _native),
    "hf": (HF_DEFAULTS, _hf),
}


def _entry(name):
    if not isinstance(name, str) or name not in BACKBONES:
        raise unknown_choice("model.backbone", name, list(BACKBONES))
    return BACKBONES[name]


def backbone_defaults(name: str, native: Dict[str, Any]) -> Dict[str, Any]:
    """The keys (with defaults) a model section naming ``backbone: name`` may hold; ``native`` is
    the config's default model section."""
    defaults = _entry(name)[0]
    return {**(native if defaults is None else defaults), "backbone": name}


def build_backbone(options: Dict[str, Any], vocab_size: int, mask_id: int, max_len: int,
                   extra_embeddings: Optional[Dict[str, int]] = None):
    """The network of a config's model section for a task of this vocabulary and length."""
    options = dict(options)
    return _entry(options.pop("backbone", "native"))[1](options, vocab_size, mask_id, max_len, extra_embeddings)
