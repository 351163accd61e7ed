"""``train.gradient_checkpointing``: recompute each block's activations in the backward pass.

Activation memory of a transformer grows with layers × batch × length; checkpointing keeps only
each block's input and recomputes the rest when the gradient needs it (Chen et al., 2016,
arXiv 1604.06174): about one more forward pass of compute for a fraction of the memory. The
backbone does it for its own blocks (``set_gradient_checkpointing``): the native transformer through
``torch.utils.checkpoint``, a Hugging Face model through its own ``gradient_checkpointing_enable``.
"""
from __future__ import annotations

from torch import nn


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Ask ``model`` to recompute its blocks' activations; a one-line error where it cannot."""
    switch = getattr(model, "set_gradient_checkpointing", None)
    if switch is None:
        raise ValueError(f"train.gradient_checkpointing=true: the model ({type(model).__name__}) has no "
                         f"set_gradient_checkpointing; set train.gradient_checkpointing=false")
    switch(True)
