"""Record (or check) the numbers every refactor must leave bit-identical.

Tiny runs of every order (incl. the learned one), linear regression and the marginals-vs-joint toy, the
outputs of every decoder on fixed models, and likelihood bounds. Each number is what the public
API returns; each tensor is a sha256 of its bytes. Timings are dropped.

    python tests/golden/record.py --write     # record tests/golden/golden.json (before a change)
    python tests/golden/record.py             # print differences against it (after a change)

``tests/test_golden.py`` runs the same collection and asserts equality.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

GOLDEN = Path(__file__).with_name("golden.json")
TIME_KEYS = ("second", "time", "tokens_per_s", "_s", "elapsed", "wall", "throughput", "per_s", "flops_per_s", "mfu")


def tensor_hash(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(str(t.dtype).encode() + str(tuple(t.shape)).encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def clean(obj):
    """JSON-able copy without timings; floats kept exactly (repr round-trips)."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()
                if not any(s in str(k).lower() for s in TIME_KEYS)}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return tensor_hash(obj)
    if isinstance(obj, float) and math.isnan(obj):
        return "nan"
    return obj


def state_hash(model) -> dict:
    return {k: tensor_hash(v) for k, v in sorted(model.state_dict().items())}


SUDOKU = {"name": "sudoku", "size": 4, "n_clues": 5, "n_train": 200, "n_eval": 16, "seed": 0}
ORDERS = [{"name": "random"}, {"name": "ar"}, {"name": "block", "block_size": 4},
          {"name": "prefix_block", "block_size": 4}, {"name": "jigsaw", "block_size": 4},
          {"name": "scatter", "block_size": 4}, {"name": "learned"},
          {"name": "random", "schedule": "cosine"}]
MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 2}
# Each case replaces the whole train section (cfg.update below), so keys left out take TrainConfig's
# defaults: lr is pinned to the 3e-4 those defaults had when this record was made.
# precision is pinned: the default "auto" decides by timing the machine, and the record must not.
TRAIN = {"steps": 3, "batch_size": 8, "lr": 3e-4, "warmup_steps": 1, "log_every": 1, "eval_every": 2,
         "checkpoint_every": 2, "progress": False, "precision": "fp32"}


def train_runs(out: Path) -> dict:
    from anyorder.config import load_config
    from anyorder.evaluation.likelihood import likelihood_of_run
    from anyorder.experiment import evaluate, load_run, train

    res = {}
    cases = [(f"sudoku-{o['name']}-{o.get('block_size', o.get('schedule', ''))}", {
        "name": "x", "task": SUDOKU, "order": o, "model": MODEL, "train": TRAIN,
        "eval": {"n": 16}, "decode": [{"name": "margin"}]}) for o in ORDERS]
    cases.append(("sudoku-random-clamp-ema", {"name": "x", "task": SUDOKU, "order": {"name": "random"},
                  "weighting": "clamp", "model": MODEL, "train": {**TRAIN, "ema": 0.9, "grad_accum": 2},
                  "eval": {"n": 16}, "decode": [{"name": "top_prob", "k": 2}]}))
    cases.append(("linreg-ar", {"name": "x", "task": {"name": "linear_regression", "d": 2, "n_prompt": 3,
                  "n_query": 3, "n_eval": 16, "seed": 0}, "order": {"name": "ar"}, "weighting": "uniform",
                  "model": MODEL, "train": TRAIN, "eval": {"n": 16}}))
    cases.append(("linreg-jigsaw", {"name": "x", "task": {"name": "linear_regression", "d": 2, "n_prompt": 3,
                  "n_query": 3, "n_eval": 16, "seed": 0}, "order": {"name": "jigsaw", "block_size": 2},
                  "weighting": "uniform", "model": MODEL, "train": TRAIN, "eval": {"n": 16}}))
    cases.append(("star-block", {"name": "x", "task": {"name": "star_graph", "degree": 2, "path_len": 3,
                  "num_nodes": 10, "n_train": 64, "n_eval": 16, "seed": 0}, "order": {"name": "block", "block_size": 2},
                  "model": MODEL, "train": TRAIN, "eval": {"n": 16}, "decode": [{"name": "top_prob"}]}))
    for label, c in cases:
        cfg = load_config(None, [])
        cfg.update({k: v for k, v in c.items()})
        cfg["out_dir"] = str(out)
        cfg["name"] = label
        run_dir = train(cfg)
        exp = load_run(run_dir)
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((run_dir / "summary.json").read_text())
        row = {"weights": state_hash(exp.model), "metrics": clean(metrics),
               "summary_eval": clean(summary.get("eval", summary.get("final_eval", {})))}
        row["evaluate"] = clean(evaluate(exp, exp.cfg["decode"][0], n=16))
        if "linreg" not in label:
            row["likelihood"] = clean(likelihood_of_run(exp, split="test", samples=2, n=16, seed=0))
        res[label] = row
    return res


def decoder_outputs() -> dict:
    from anyorder.decoding import build_decoder
    from anyorder.model import ModelConfig, Transformer
    from anyorder.orders import build_order

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=9, mask_id=8, d_model=32, n_layers=2, n_heads=2, max_len=64)).eval()
    g = torch.Generator().manual_seed(0)
    B, L = 3, 16
    x = torch.randint(0, 8, (B, L), generator=g)
    answer = torch.zeros(B, L, dtype=torch.bool)
    answer[:, 4:] = True
    answer[1, 3] = True  # rows with different prompts
    x = torch.where(answer, torch.full_like(x, 8), x)
    # the built-in decoders by name (not DECODERS.names(): a test may have registered a plugin's)
    builtin = ["ancestral", "beam", "edit", "entropy", "jigsaw_entropy", "left_to_right", "margin", "random",
               "random_init", "remask", "scatter_offsets", "threshold", "top_prob"]
    specs = [{"name": n} for n in builtin]
    specs += [{"name": "top_prob", "k": 2}, {"name": "margin", "temperature": 1.0, "seed": 3},
              {"name": "entropy", "steps": 8, "block_size": 4}, {"name": "top_prob", "cache": True},
              {"name": "threshold", "tau": 0.2}, {"name": "margin", "block_size": 4}, {"name": "top_prob", "temperature": 0.7, "top_k": 3, "top_p": 0.9}]
    orders = [{"name": "random"}, {"name": "ar"}, {"name": "block", "block_size": 4},
              {"name": "prefix_block", "block_size": 4}, {"name": "jigsaw", "block_size": 4},
              {"name": "scatter", "block_size": 4}]
    out = {}
    for o in orders:
        order = build_order(dict(o))
        for spec in specs:
            key = f"{o['name']}|{json.dumps(spec, sort_keys=True)}"
            try:
                dec = build_decoder(dict(spec))
                r = dec.decode(model, order, x.clone(), answer, row_seeds=[5, 6, 7])
                out[key] = {"tokens": tensor_hash(r.tokens), "step": tensor_hash(r.trace.finalize_step),
                            "conf": tensor_hash(r.trace.confidence), "nfe": r.trace.nfe.tolist(),
                            "summary": clean(r.trace.summary())}
            except Exception as e:  # record that it refuses; the message may be reworded
                out[key] = f"error {type(e).__name__}"
    # the learned decoders on a LoMDM-wrapped backbone
    lo = build_order({"name": "learned"})
    torch.manual_seed(1)
    lomdm = lo.wrap(Transformer(ModelConfig(vocab_size=9, mask_id=8, d_model=32, n_layers=2, n_heads=2, max_len=64))).eval()
    for spec in [{"name": "learned_ancestral"}, {"name": "learned_velocity"}, {"name": "top_prob"},
                 {"name": "learned_ancestral", "steps": 4, "temperature": 1.0}]:
        dec = build_decoder(dict(spec))
        r = dec.decode(lomdm, lo, x.clone(), answer, row_seeds=[5, 6, 7])
        out[f"learned|{json.dumps(spec, sort_keys=True)}"] = {
            "tokens": tensor_hash(r.tokens), "step": tensor_hash(r.trace.finalize_step),
            "conf": tensor_hash(r.trace.confidence), "nfe": r.trace.nfe.tolist()}
    return out


def toy() -> dict:
    from anyorder.studies.toy import run_toy
    return clean(run_toy(steps=30))


def collect() -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        return {"decoders": decoder_outputs(), "toy": toy(), "train": train_runs(Path(d))}


def diff(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{path}{k}: {'missing now' if k not in b else 'new'}")
            else:
                out += diff(a[k], b[k], f"{path}{k}.")
        return out
    return [] if a == b else [f"{path[:-1]}: {a!r} -> {b!r}"]


if __name__ == "__main__":
    now = collect()
    if "--write" in sys.argv:
        GOLDEN.write_text(json.dumps(now, indent=1, sort_keys=True))
        print(f"wrote {GOLDEN}")
    else:
        d = diff(json.loads(GOLDEN.read_text()), json.loads(json.dumps(now)))
        print("\n".join(d) if d else "bit-identical")
        sys.exit(1 if d else 0)
