"""LoRA adapters on a Hugging Face backbone through ``peft`` (``pip install anyorder[lora]``).

    model: {backbone: hf, path: DIR, lora: {r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}}

``r: 0``, the default, means no adapters (every weight trains); ``anyorder train CONFIG
model.lora.r=16`` turns them on.

LoRA (Hu et al., 2021, arXiv 2106.09685) adds a trainable low-rank update ``B A`` (scaled by
``alpha / r``) beside each targeted linear layer; ``B`` starts at zero, so the adapted model
computes exactly what the pretrained one did at step 0. What trains:

- the adapters (``lora_A`` / ``lora_B`` of every targeted layer);
- the input-embedding row of the mask token (``train_mask_row: true``, the default), through
  peft's trainable tokens: an AR model never read [MASK] (a new or repurposed token), and order
  fine-tuning must teach it what a hidden position is; the row's delta starts at zero and is all
  that changes in the embedding table. ``false`` freezes it (a masked-diffusion model such as
  LLaDA already reads its mask token);
- the task's extra embeddings (Sudoku row/column/box), which are new.

Everything else is frozen (``requires_grad=False``: the trainer's AdamW never sees it). The
adapters are injected in place (``peft.inject_adapter_in_model``), so the backbone keeps its
structure and a run's ``model.safetensors`` holds base weights and adapters under stable names.
:func:`merge_lora` folds every adapter into its base layer (``W + alpha/r B A``; the mask row's
delta into the table) and puts the plain layers back: what ``anyorder export`` saves.

The output head is never adapted (excluded by its full module name, whatever
``target_modules`` says): ``all-linear`` means the transformer's linear layers, and a list such
as ``[q_proj, ff_out]`` names layers inside the blocks even where the head shares a last name
(LLaDA: ``transformer.ff_out``, the head, beside ``blocks.i.ff_out``, each block's MLP output).
"""
from __future__ import annotations

import re
from typing import Any, Dict

import torch.nn as nn

from ..checks import check_bool, check_float, check_int, check_mapping, show

LORA_DEFAULTS: Dict[str, Any] = {"r": 0, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear",
                                 "train_mask_row": True}


def check_lora_options(options: Any) -> Dict[str, Any]:
    """``model.lora`` with defaults filled in and every value checked (one-line ValueErrors)."""
    unknown = sorted(set(check_mapping("model.lora", options)) - set(LORA_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown model.lora option(s) {', '.join(unknown)}. Valid options: {', '.join(LORA_DEFAULTS)}")
    opts = {**LORA_DEFAULTS, **options}
    check_int("model.lora.r", opts["r"], 0)
    check_float("model.lora.alpha", opts["alpha"], 0, lo_open=True)
    check_float("model.lora.dropout", opts["dropout"], 0, 1, hi_open=True)
    check_bool("model.lora.train_mask_row", opts["train_mask_row"])
    tm = opts["target_modules"]
    if not (isinstance(tm, str) and tm.strip()) and not (isinstance(tm, list) and tm and all(isinstance(t, str) for t in tm)):
        raise ValueError(f"model.lora.target_modules must be 'all-linear', a module-name regex or a list of module "
                         f"names (e.g. [q_proj, v_proj]), got {show(tm)}")
    return opts


def _peft():
    try:
        import peft  # lazy: optional dependency (the 'lora' extra)
    except ImportError:
        raise ModuleNotFoundError("model.lora needs peft: `pip install peft` (or `pip install -e \".[lora]\"`)") from None
    return peft


def apply_lora(backbone: nn.Module, options: Dict[str, Any]) -> nn.Module:
    """Inject LoRA adapters into ``backbone.hf`` in place and freeze all but what trains (module doc)."""
    opts = check_lora_options(options)
    if int(opts["r"]) < 1:
        raise ValueError(f"model.lora.r must be >= 1 to add adapters, got {opts['r']}")
    peft = _peft()
    head = output_head_name(backbone.hf)
    config = peft.LoraConfig(r=int(opts["r"]), lora_alpha=float(opts["alpha"]), lora_dropout=float(opts["dropout"]),
                             target_modules=opts["target_modules"],
                             exclude_modules=None if head is None else re.escape(head),
                             trainable_token_indices=[backbone.cfg.mask_id] if opts["train_mask_row"] else None)
    try:
        peft.inject_adapter_in_model(config, backbone.hf)
    except ValueError as exc:   # peft: no module matched target_modules
        raise ValueError(f"model.lora.target_modules {show(opts['target_modules'])} matches no layer of "
                         f"{type(backbone.hf).__name__}: {str(exc).splitlines()[0]}") from None
    for name, p in backbone.named_parameters():
        p.requires_grad_(is_trained(name))
    return backbone


def output_head_name(hf: nn.Module):
    """The module name of the model's output head when it is a linear layer, else None. Names
    match LoRA targets by suffix, and LLaDA's head ``model.transformer.ff_out`` shares its last
    name with every block's MLP output (``blocks.i.ff_out``): the head is excluded by full name."""
    get = getattr(hf, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear):
        return None
    return next((name for name, module in hf.named_modules() if module is head), None)


def is_trained(name: str) -> bool:
    """Whether a LoRA backbone's parameter ``name`` trains: adapters, the mask row's delta, extras."""
    return "lora_" in name or "trainable_tokens_delta" in name or name.startswith("extra.")


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in n or "trainable_tokens_delta" in n for n, _ in model.named_parameters())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weights and restore the plain modules, in place."""
    if not has_lora(model):
        return model
    _peft()
    from peft.tuners.tuners_utils import BaseTunerLayer  # lazy: peft is optional
    from peft.utils.other import AuxiliaryTrainingWrapper  # lazy: peft is optional

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()

    def plain(module: nn.Module) -> nn.Module:
        if isinstance(module, AuxiliaryTrainingWrapper):   # the trainable-token wrapper of a table
            module = module.original_module
        return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module

    def unwrap(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            base = plain(child)
            if base is not child:
                setattr(parent, name, base)
            else:
                unwrap(child)

    unwrap(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
