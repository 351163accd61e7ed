"""Experiment configs: nested dicts from YAML, dotted ``key=value`` overrides, strict keys.

Every section has a default here; a key that is not in the defaults is an error naming the
closest valid key, so a typo never silently trains the wrong model. Sections whose content
depends on a registered name (``task``, ``order``, ``decode``) accept the options of the
class that name selects; those are checked when the class is built.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from .checks import check_mapping, show
from .model.backbones import backbone_defaults
from .model.transformer import ModelConfig
from .train.config import TrainConfig


def _field_defaults(cls) -> Dict[str, Any]:
    """A dataclass's field defaults by name, in field order; tuples as lists (YAML has no tuples)."""
    return {f.name: list(f.default) if isinstance(f.default, tuple) else f.default
            for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


# the model options a config sets, in this order (vocab_size, mask_id, max_len and the extra
# embeddings come from the task)
_MODEL_KEYS = ("d_model", "n_layers", "n_heads", "mlp", "mlp_ratio", "time_conditioning", "tie_embeddings", "rope_base")
_MODEL_DEFAULTS = _field_defaults(ModelConfig)

# The defaults of the model and train sections are those of ModelConfig and TrainConfig.
DEFAULTS: Dict[str, Any] = {
    "name": "run",
    "out_dir": "runs",
    "seed": 0,
    # Python files or modules imported before anything is built: where user orders, decoders,
    # scores and tasks register themselves (e.g. ["examples/right_to_left.py"])
    "plugins": [],
    "task": {"name": "sudoku"},
    "order": {"name": "random"},
    # build a model whose training the memory estimate says will not fit (anyorder.checks.check_size).
    # Top level, not in train: it guards building the model, and train: stays TrainConfig's fields
    "force_size": False,
    "weighting": None,             # None = the order's default (elbo / clamp)
    "objective": None,             # None = the one the task or the order names (anyorder.objectives)
    "model": {k: _MODEL_DEFAULTS[k] for k in _MODEL_KEYS},
    "train": {
        **{k: v for k, v in _field_defaults(TrainConfig).items() if k != "seed"},  # seed: top level
        # train to a FLOP budget instead: steps = floor(flops_budget / counted FLOPs per step). Not a
        # TrainConfig field: the experiment resolves it into ``steps`` before the TrainConfig is built.
        "flops_budget": None,
    },
    "eval": {"n": 256, "batch_size": 256},
    # decoders evaluated by `anyorder eval` (each a name or {name: ..., options})
    "decode": [{"name": "top_prob"}],
}

# sections whose keys are free-form (checked by the registered class they select)
OPEN_SECTIONS = {"task", "order"}


def _suggest(key: str, choices) -> str:
    close = difflib.get_close_matches(str(key), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def section_defaults(name: str, value: Any) -> Dict[str, Any]:
    """The defaults a top-level section is checked against: a model section that names a
    ``backbone`` takes that backbone's keys (anyorder.model.backbones)."""
    if name == "model" and isinstance(value, dict) and "backbone" in value:
        return backbone_defaults(value["backbone"], DEFAULTS["model"])
    return DEFAULTS.get(name)


def merge(base: Dict[str, Any], update: Dict[str, Any], path: str = "") -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in (update or {}).items():
        where = f"{path}{k}"
        if path == "" and k in out and section_defaults(k, v) is not DEFAULTS.get(k):
            out[k] = merge(section_defaults(k, v), v, where + ".")  # another backbone: its own keys
            continue
        if k not in out:
            raise ValueError(f"unknown config key {where!r}.{_suggest(k, out)} "
                             f"Valid keys{' in ' + path[:-1] if path else ''}: {', '.join(sorted(out))}")
        if isinstance(out[k], dict) and path == "" and k in OPEN_SECTIONS:
            out[k] = copy.deepcopy(v) if isinstance(v, dict) else v
        elif isinstance(out[k], dict) and isinstance(v, dict):
            out[k] = merge(out[k], v, where + ".")
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_yaml(text: str, where: str):
    """``yaml.safe_load(text)``, a malformed document being a one-line ValueError naming ``where``
    (a file or an override) and the line and column of the problem."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        what = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ValueError(f"{where} is not valid YAML{at}: {what}") from None


def parse_override(item: str):
    if "=" not in item:
        raise ValueError(f"override {item!r} is not of the form key=value (e.g. train.steps=200)")
    key, val = item.split("=", 1)
    return key.strip(), read_yaml(val, f"override {item!r}") if val.strip() else ""


def apply_overrides(cfg: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        key, val = parse_override(item)
        parts = key.split(".")
        node = cfg
        for i, p in enumerate(parts[:-1]):
            if not isinstance(node, dict) or p not in node:
                raise ValueError(f"unknown config key {'.'.join(parts[:i + 1])!r}.{_suggest(p, node if isinstance(node, dict) else [])}")
            node = node[p]
        last = parts[-1]
        open_section = len(parts) == 2 and parts[0] in OPEN_SECTIONS
        if not isinstance(node, dict) or (last not in node and not open_section):
            valid = sorted(node) if isinstance(node, dict) else []
            raise ValueError(f"unknown config key {key!r}.{_suggest(last, valid)} Valid keys: {', '.join(valid)}")
        if node is cfg and last not in OPEN_SECTIONS and isinstance(DEFAULTS.get(last), dict):
            merge(section_defaults(last, val), check_mapping(last, val), last + ".")  # a whole section: its keys checked
        node[last] = val
    return cfg


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Dict[str, Any]:
    user: Dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {str(p)!r} does not exist" + (" (a folder)" if p.exists() else ""))
        user = read_yaml(p.read_text(errors="replace"), f"config file {str(p)!r}") or {}
        if not isinstance(user, dict):
            raise ValueError(f"config file {str(p)!r} must hold a mapping at the top level")
    cfg = merge(DEFAULTS, user)
    cfg = apply_overrides(cfg, overrides or [])
    return normalise(cfg)


def normalise(cfg: Dict[str, Any]) -> Dict[str, Any]:
    missing = [k for k in ("seed", "task", "order", "model", "decode") if k not in check_mapping("a config", cfg)]
    if missing:
        raise ValueError(f"the config has no {', '.join(map(repr, missing))} (a run's config.yaml holds every key)")
    for sec in ("task", "order"):
        if isinstance(cfg[sec], str):
            cfg[sec] = {"name": cfg[sec]}
        if not isinstance(cfg[sec], dict) or "name" not in cfg[sec]:
            raise ValueError(f"config section {sec!r} needs a 'name', got {show(cfg[sec])}")
    for sec in ("model", "train", "eval"):
        check_mapping(sec, cfg.get(sec, {}))
    cfg["eval"] = {**DEFAULTS["eval"], **cfg.get("eval", {})}  # eval={} or an older run: the defaults
    if isinstance(cfg["decode"], (str, dict)):
        cfg["decode"] = [cfg["decode"]]
    if not isinstance(cfg["decode"], list) or not all(isinstance(d, (str, dict)) for d in cfg["decode"]):
        raise ValueError(f"decode must be a list of decoder names or {{name: ..., option: value}} dicts, "
                         f"got {show(cfg['decode'])}")
    cfg["decode"] = [{"name": d} if isinstance(d, str) else dict(d) for d in cfg["decode"]]
    return cfg


def dump(cfg: Dict[str, Any]) -> str:
    return yaml.safe_dump(json.loads(json.dumps(cfg)), sort_keys=False)
