"""Compare text runs of different orders: likelihood bounds, generative perplexity, repetition.

    python -m anyorder.studies.text_compare runs/text-compare/* --judge runs/text-judge --out DIR
    anyorder text-compare runs/text-compare/* --judge runs/text-judge --out DIR

Writes ``DIR/text_compare.md`` and ``DIR/text_compare.json``, one row per run
(:mod:`.text_compare_report` writes the table):

- order, parameters, training FLOPs (the last cumulative ``flops`` in metrics.jsonl) and steps;
- test and zero-shot perplexity, the run's own bound (``exp.objective.likelihood``): exact for
  AR, the NELBO upper bound ± Monte-Carlo standard error for every diffusion order (``mc``
  replicates, stratified t). LoMDM's bound is its own NELBO, ``L_main + L_velocity`` under its
  learned forward process (:func:`anyorder.objectives.lomdm.lomdm_likelihood`): the velocity
  term is what the sampler's schedule k̂_ψ costs for not being k_φ;
- generative perplexity: ``samples`` sequences of ``seq_len`` decoded from all-mask at
  temperature 1 (float64 Gumbel-max) by the order's natural sampler (:func:`sampler_spec`),
  scored by the exact NLL of an AR judge trained on the same corpus (``--judge``);
- unigram entropy of each sample's token histogram (mean over samples), and the same for real
  test rows: samples far below the real text's entropy repeat themselves.

For a run whose model learned its order (LoMDM) it adds the plots of what the order learned
(:func:`anyorder.studies.lomdm_velocity.plot_lomdm_velocity`).

Cost: each sampling step runs a forward pass and a float64 softmax over the whole
``[rows, L, V]`` logits; the Gumbel noise is drawn only where a token can be committed now
(:class:`CommittableSampling`), a fraction of the library sampler's noise at a large V.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
import yaml

from ..decoding.loop import DECODERS, renamed_options
from ..decoding.sampling import gumbel_noise
from ..experiment import load_run
from .lomdm_velocity import has_learned_order, plot_lomdm_velocity, velocity_markdown
from .text_compare_report import markdown

# -- sampling -------------------------------------------------------------------------------


class CommittableSampling:
    """Mixin for a decoder: draw the token proposal (float64 Gumbel-max, as
    :func:`anyorder.decoding.sampling.sample_tokens`) only at positions the order lets the
    decoder commit now (masked ∩ ``order.allowed``); elsewhere the proposal is never read and
    stays the current token. Same distribution, row-by-row streams (row b draws only from its
    own generator, for its own positions), a fraction of the noise at V = 8192."""

    def propose(self, dist, st):
        if self.temperature == 0 or self.top_k or self.top_p < 1:
            return super().propose(dist, st)
        # the candidates as this mixin has always drawn for: masked ∩ the order's rule (no window)
        cand = st.masked & st.order.allowed(st.masked, st.layout, dist.logp() if st.order.reads_logp else None)
        lp = (dist.logp_at() if self.temperature == 1
              else F.log_softmax(dist.logits_at().double() / self.temperature, dim=-1))
        b, pos = dist.where.nonzero(as_tuple=True)
        noise = torch.empty_like(lp)
        for row in range(len(st.gens)):
            idx = cand[row].nonzero().squeeze(-1)
            if len(idx) == 0:
                continue
            u = gumbel_noise((len(idx), lp.shape[-1]), [st.gens[row]])[0]  # one row per candidate
            sel = b == row
            noise[sel] = u[torch.searchsorted(idx, pos[sel])]
        return dist.put((lp + noise).argmax(-1), st.x)


def sampling_decoder(spec: Dict[str, object]):
    """The registered decoder ``spec['name']`` with :class:`CommittableSampling` mixed in."""
    cls, options = DECODERS.resolve(renamed_options(dict(spec)))
    lean = type(f"Committable{cls.__name__}", (CommittableSampling, cls), {})
    return lean(**options)


def sampler_spec(order, seq_len: int, steps: Optional[int] = None) -> Dict[str, object]:
    """The sampler ``order`` is trained for (:meth:`~anyorder.orders.base.Order.natural_decoder`:
    AR left to right with the KV cache; block diffusion, as in BD3-LM (Arriola et al., 2025,
    arXiv 2503.09573), MDLM's ancestral sampler inside each block; Scatter column by column;
    LoMDM its learned ancestral sampler; random masking MDLM's ancestral sampler (Sahoo et al.,
    2024, arXiv 2406.07524)) at temperature 1, with a budget of ``steps`` forward passes
    (default ``seq_len``)."""
    return {**order.natural_decoder(int(seq_len), steps), "temperature": 1.0}


@torch.no_grad()
def generate(exp, n: int, spec: Dict[str, object], seed: int = 0, batch_size: int = 16) -> Dict[str, object]:
    """``n`` unconditional sequences of the task's ``seq_len`` decoded from all-mask, with the
    decoding trace: ``finalize_steps``, ``confidence`` (the probability of each token when it was
    committed) and ``steps``, the steps the sampler took (the last finalisation step + 1, most
    over the rows). Row i uses the generator seed ``seed * 1_000_003 + i``: the same for every run."""
    L, mask_id = exp.task.seq_len, exp.task.mask_id
    dec = sampling_decoder(spec)
    extra = exp.task.extra()
    toks, nfe, fin, conf = [], [], [], []
    t0 = time.perf_counter()
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        x = torch.full((b, L), mask_id, dtype=torch.long)
        answer = torch.ones(b, L, dtype=torch.bool)
        r = dec.decode(exp.model, exp.order, x, answer, extra=extra,
                       row_seeds=[seed * 1_000_003 + j for j in range(i, i + b)])
        toks.append(r.tokens)
        nfe.append(r.trace.nfe)
        fin.append(r.trace.finalize_step)
        conf.append(r.trace.confidence)
    tokens = torch.cat(toks)
    if (tokens == mask_id).any():
        raise RuntimeError(f"decoder {spec} left [MASK] tokens in the samples")
    nfe, fin = torch.cat(nfe).double(), torch.cat(fin)
    return {"tokens": tokens, "finalize_steps": fin, "confidence": torch.cat(conf),
            "steps": int(fin.max()) + 1, "nfe_mean": float(nfe.mean()),
            "seconds": time.perf_counter() - t0}


# -- measures ---------------------------------------------------------------------------------

def unigram_entropy(tokens: torch.Tensor, answer: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[N] entropy (nats) of each row's token histogram over its ``answer`` positions (all by
    default): 0 for a constant row, log(n) for n distinct tokens."""
    out = []
    for b in range(len(tokens)):
        row = tokens[b] if answer is None else tokens[b][answer[b].bool()]
        p = torch.unique(row, return_counts=True)[1].double()
        p = p / p.sum()
        out.append(float(-(p * p.log()).sum()) if len(p) else float("nan"))
    return torch.tensor(out, dtype=torch.float64)


def judge_nll(judge, tokens: torch.Tensor) -> Dict[str, float]:
    """Exact AR NLL of ``tokens`` [N, L] (every position scored) under the judge run: nats per
    token, ``gen_ppl = exp`` of it, and ±2 standard errors over the N sequences."""
    if not judge.order.exact_likelihood:
        raise ValueError(f"the judge must be an AR run (order 'ar', efficient plan) so that its NLL is exact; "
                         f"got order {judge.order.name!r}")
    ones = torch.ones(1, tokens.shape[1], dtype=torch.bool)
    per_row = torch.tensor([judge.objective.likelihood(judge.model, row[None], ones, samples=1)["nelbo_per_token"]
                            for row in tokens], dtype=torch.float64)
    mean = float(per_row.mean())  # every row has the same length: the mean of rows is the mean of tokens
    se = float(per_row.std()) / math.sqrt(len(per_row)) if len(per_row) > 1 else float("nan")
    return {"nll_per_token": mean, "nll_stderr": se, "gen_ppl": math.exp(mean),
            "gen_ppl_low": math.exp(mean - 2 * se), "gen_ppl_high": math.exp(mean + 2 * se),
            "tokens": int(tokens.numel())}


@torch.no_grad()
def split_likelihood(exp, split: str, n: Optional[int], mc: int, seed: int, batch_size: int = 64):
    """Test / zero-shot likelihood of a run on ``n`` rows of a split (None if the task lacks it)."""
    try:
        x0, answer = exp.task.split_set(split, n)
    except ValueError:
        return None
    return exp.objective.likelihood(exp.model, x0, answer, samples=mc, batch_size=batch_size, seed=seed)


# -- run metadata -----------------------------------------------------------------------------

def training_record(run_dir: Path) -> Dict[str, object]:
    """Last cumulative training FLOPs and step (metrics.jsonl, else summary.json)."""
    flops = step = None
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn last line
            if "step" in row:
                step = max(step or 0, int(row["step"]))
            if row.get("flops") is not None:
                flops = float(row["flops"])
    summ = run_dir / "summary.json"
    if summ.exists():
        s = json.loads(summ.read_text())
        step = s.get("step", step)
        flops = s.get("metrics", {}).get("flops", flops)
    return {"flops": flops, "steps": step}


def _same_tokens(a, b) -> bool:
    ta, tb = getattr(a.task, "tokenizer", None), getattr(b.task, "tokenizer", None)
    if ta is None or tb is None:
        return a.task.vocab_size == b.task.vocab_size
    return ta.key() == tb.key() and ta.describe() == tb.describe()


# -- the comparison ---------------------------------------------------------------------------

def compare_runs(run_dirs: Sequence[Union[str, Path]], judge_dir: Union[str, Path], out: Union[str, Path],
                 samples: int = 32, mc: int = 4, seed: int = 0, n: Optional[int] = 256, steps: Optional[int] = None,
                 decoders: Optional[Dict[str, Dict]] = None, batch_size: int = 16, velocity: bool = True,
                 log=print) -> Dict[str, object]:
    """Evaluate every run (see the module docstring); writes text_compare.md/.json to ``out``.

    samples: generated sequences per run; mc: Monte-Carlo replicates of each bound; n: rows of
    the test and zero-shot splits (spread over the split; None = all); steps: decoding step
    budget (default seq_len); decoders: {run label: decoder spec} overriding the natural one;
    batch_size: rows decoded at once."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    judge_dir = Path(judge_dir)
    judge = load_run(judge_dir)
    if not judge.order.exact_likelihood:
        raise ValueError(f"--judge {judge_dir} has order {judge.order.name!r}; the judge must be an AR run")
    x_ref, a_ref = judge.task.split_set("test", samples)
    reference = {"rows": int(len(x_ref)), "unigram_entropy": float(unigram_entropy(x_ref, a_ref).mean()),
                 **({"judge": judge_nll(judge, x_ref)} if bool(a_ref.all()) else {})}
    rows, sections = [], []
    for rd in map(Path, run_dirs):
        label = rd.name
        log(f"[text-compare] {label}: loading")
        exp = load_run(rd)
        if not _same_tokens(exp, judge):
            raise ValueError(f"{rd} and the judge {judge_dir} use different tokenizers: gen PPL needs the same ids")
        if exp.task.seq_len > judge.task.seq_len:
            raise ValueError(f"{rd} samples {exp.task.seq_len} tokens but the judge {judge_dir} was trained on "
                             f"{judge.task.seq_len}: train the judge at least as long")
        row = {"label": label, "run_dir": str(rd), "order": exp.order.label(), "order_name": exp.order.name,
               "params": sum(p.numel() for p in exp.model.parameters()),
               "params_backbone": sum(p.numel() for p in getattr(exp.model, "backbone", exp.model).parameters()),
               **training_record(rd), "judge_is_this_run": rd.resolve() == judge_dir.resolve()}
        for split in ("test", "zero_shot"):
            log(f"[text-compare] {label}: {split} likelihood ({mc} MC replicates)")
            row[split] = split_likelihood(exp, split, n, mc, seed)
        spec = dict((decoders or {}).get(label) or sampler_spec(exp.order, exp.task.seq_len, steps))
        spec.setdefault("temperature", 1.0)
        log(f"[text-compare] {label}: sampling {samples} x {exp.task.seq_len} tokens with {spec}")
        g = generate(exp, samples, spec, seed=seed, batch_size=batch_size)
        ent = unigram_entropy(g["tokens"])
        ent_se = float(ent.std() / math.sqrt(len(ent))) if len(ent) > 1 else float("nan")
        example = exp.task.decode_text(g["tokens"][0]) if hasattr(exp.task, "decode_text") else None
        row["generation"] = {"decoder": spec, "steps": g["steps"],
                             "nfe_mean": g["nfe_mean"], "samples": samples, "seconds": round(g["seconds"], 2),
                             **judge_nll(judge, g["tokens"]),
                             "unigram_entropy": float(ent.mean()),
                             "unigram_entropy_se": ent_se, "example": example}
        torch.save(g["tokens"], out / f"samples_{label}.pt")
        if velocity and has_learned_order(exp.model):
            log(f"[text-compare] {label}: what the learned order learned")
            v = plot_lomdm_velocity(rd, out / label, n=n or 256, exp=exp, title=label,
                                    finalize_steps=g["finalize_steps"])
            row["velocity"] = {k: v[k] for k in ("k_mean", "k_std", "spearman_k_vs_position",
                                                 "spearman_k_vs_log_freq", "by_kind")}
            row["velocity"]["paths"] = {k: f"{label}/{p}" for k, p in v["paths"].items()}
            sections.append(velocity_markdown(v, v["paths"], label, prefix=f"{label}/"))
        rows.append(row)
    result = {"rows": rows, "reference": reference,
              "judge": {"run_dir": str(judge_dir), "params": sum(p.numel() for p in judge.model.parameters()),
                        **training_record(judge_dir)},
              "task": describe_task(judge.task),
              "settings": {"samples": samples, "mc": mc, "seed": seed, "n": n, "steps": steps,
                           "batch_size": batch_size, "threads": torch.get_num_threads()}}
    (out / "text_compare.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "text_compare.md").write_text(markdown(result, sections))
    return result


def describe_task(task) -> Dict[str, object]:
    d = task.describe()
    return {k: d.get(k) for k in ("name", "seq_len", "mode", "sources", "zero_shot", "tokenizer")}


# -- command line -----------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", help="run directories (one row each; the label is the folder name)")
    p.add_argument("--judge", required=True, help="AR run trained on the same corpus (scores the samples)")
    p.add_argument("--out", required=True, help="output folder for text_compare.md/.json and plots")
    p.add_argument("--samples", type=int, default=32, help="generated sequences per run (default 32)")
    p.add_argument("--mc", type=int, default=4, help="Monte-Carlo replicates of each NELBO bound (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=256, help="rows of the test / zero-shot split (default 256; 0 = all)")
    p.add_argument("--steps", type=int, default=None, help="decoding step budget (default seq_len)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=16, help="rows decoded at once")
    p.add_argument("--decoder", action="append", default=None, metavar="LABEL=SPEC",
                   help="override a run's sampler, e.g. --decoder mdlm='{name: top_prob, k: 1, temperature: 1}'")


def run_from_args(args) -> Dict[str, object]:
    decoders = {}
    for item in args.decoder or []:
        label, sep, spec = item.partition("=")
        if not sep:
            raise ValueError(f"--decoder expects LABEL=SPEC, got {item!r}")
        spec = yaml.safe_load(spec)
        decoders[label.strip()] = {"name": spec} if isinstance(spec, str) else dict(spec)
    res = compare_runs(args.run_dirs, args.judge, args.out, samples=args.samples, mc=args.mc, seed=args.seed,
                       n=args.n or None, steps=args.steps, decoders=decoders, batch_size=args.batch_size,
                       log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"table: {Path(args.out) / 'text_compare.md'}")
    return res


def main(argv: Optional[List[str]] = None) -> int:
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(prog="python -m anyorder.studies.text_compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        run_from_args(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"text_compare: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
