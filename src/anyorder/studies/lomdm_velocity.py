"""What a LoMDM run learned: its per-token exponents against position, frequency and token kind.

LoMDM ("Unifying Masked Diffusion Models with Various Generation Orders and Beyond", arXiv
2602.02112; :mod:`anyorder.objectives.lomdm`) gives every answer position its own schedule
α_i = 1 − t^{k_i}, ``k = c1 + c2·NormSig(g_φ(f(x)))`` computed from the clean sequence. The reverse process
unmasks position i at rate A_i = k_i / t (its velocity): at every t the velocities of a row
are its exponents times one shared factor, so comparing k *is* comparing velocities. A
position stays masked down to time s with probability (s/t)^{k_i}: **a large k means revealed
early in generation** (high velocity), a small k late; the expected reveal time is
E[τ_i] = k_i / (k_i + 1) (t runs from 1, all masked, to 0).

Measured on real rows of a split (default: test): k_φ per position (mean over rows), k_φ
against the token's training-split unigram frequency (log scale, equal-count bins), and k_φ
by token kind (the token id decoded alone: separator / punctuation-or-space / word / digits /
other). Given the decoding traces of the run's own samples (``finalize_steps``), also the
order the sampler actually revealed positions in (k̂_ψ at work). k̂_ψ of the all-mask row is
not shown: with rotary positions only, every position of an all-mask row has the same hidden
state, so the sampler's first step is uniform by construction.
"""
from __future__ import annotations

import json
import math
import unicodedata
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

from ..experiment import load_run

TOKEN_KINDS = ("separator", "punct/space", "word", "digits", "other")


def classify_text(text: str) -> str:
    """Kind of one decoded token (not a special id): 'punct/space' (only punctuation, symbols or
    whitespace), 'word' (has a letter), 'digits' (has a digit, no letter), else 'other'
    (e.g. a byte piece that decodes to U+FFFD)."""
    if any(ch.isalpha() for ch in text):
        return "word"
    if any(ch.isdigit() for ch in text):
        return "digits"
    if all(ch.isspace() or unicodedata.category(ch)[0] in "PSZ" for ch in text) and "\ufffd" not in text:
        return "punct/space"  # the empty string included: a token that decodes to nothing
    return "other"


def token_kinds(tokenizer) -> List[str]:
    """Kind of every id of the vocabulary; the separator/pad/BOS/[MASK] ids are 'separator'."""
    special = {i for i in (tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id, tokenizer.mask_id) if i is not None}
    return ["separator" if i in special else classify_text(tokenizer.decode([i]))
            for i in range(tokenizer.vocab_size)]


def train_unigram_counts(task) -> torch.Tensor:
    """[V] token counts over the training rows exactly as the model sees them (separators
    included, pads excluded)."""
    x0, answer = task.rows("train")
    return torch.bincount(x0[answer.bool()], minlength=task.vocab_size).double()


def has_learned_order(model) -> bool:
    """Whether ``model`` learned its generation order (a LoMDM: it has the g_φ schedule head)."""
    return hasattr(model, "forward_exponent")


@torch.no_grad()
def learned_exponents(model, x0: torch.Tensor, answer: torch.Tensor, extra=None, batch_size: int = 64) -> torch.Tensor:
    """[N, L] float64 k_φ of clean rows (g_φ on the stop-gradient backbone features)."""
    if not has_learned_order(model):
        raise ValueError("this model has no learned schedule (g_φ head): pass a run with order 'learned'")
    out = [model.forward_exponent(x0[i:i + batch_size], answer[i:i + batch_size].bool(), extra)
           for i in range(0, len(x0), batch_size)]
    return torch.cat(out)


def reveal_rank(finalize_steps: torch.Tensor) -> torch.Tensor:
    """[N, L] rank of each position's finalisation step within its row, scaled to [0, 1]
    (0 = revealed first; positions revealed in the same step share their mean rank)."""
    out = torch.empty(finalize_steps.shape, dtype=torch.float64)
    L = finalize_steps.shape[1]
    for b in range(len(finalize_steps)):
        s = finalize_steps[b].double()
        out[b] = (s.unsqueeze(0) < s.unsqueeze(1)).sum(1) + 0.5 * ((s.unsqueeze(0) == s.unsqueeze(1)).sum(1) - 1)
    return out / max(L - 1, 1)


def _mean_se(v: torch.Tensor):
    n = v.numel()
    return float(v.mean()), (float(v.std()) / math.sqrt(n) if n > 1 else float("nan")), n


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation (average ranks for ties)."""
    def ranks(v):
        order = torch.argsort(v, stable=True)
        sv = v[order]
        r = torch.empty_like(v, dtype=torch.float64)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        _, inv, counts = torch.unique(sv, return_inverse=True, return_counts=True)  # ties: mean rank
        sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inv, r[order])
        r[order] = (sums / counts)[inv]
        return r
    ra, rb = ranks(a.double()), ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


def velocity_summary(exp, split: str = "test", n: int = 256, n_bins: int = 8, batch_size: int = 64,
                     finalize_steps: Optional[torch.Tensor] = None) -> Dict[str, object]:
    """The numbers behind the plots (see the module docstring); JSON-ready. ``finalize_steps``
    [N, L]: decoding traces of the run's samples (optional)."""
    task, model = exp.task, exp.model
    x0, answer = task.split_set(split, n) if hasattr(task, "split_set") else task.eval_set(n)
    answer = answer.bool()
    extra = task.extra()
    k = learned_exponents(model, x0, answer, extra, batch_size)
    L = x0.shape[1]
    a = answer.double()
    cnt = a.sum(0).clamp_min(1)
    pos_mean = (k * a).sum(0) / cnt
    pos_std = (((k - pos_mean) ** 2 * a).sum(0) / cnt).sqrt()
    by_position = {"k_mean": pos_mean.tolist(), "k_std": pos_std.tolist()}
    reveal = {}
    if finalize_steps is not None:
        rr = reveal_rank(finalize_steps)
        by_position["sample_reveal_rank"] = rr.mean(0).tolist()
        reveal = {"n_samples": int(len(rr)), "spearman_reveal_vs_position":
                  _spearman(rr.flatten(), torch.arange(rr.shape[1]).expand_as(rr).flatten().double())}

    counts = train_unigram_counts(task)
    logf = torch.log10(counts.clamp_min(1) / counts.sum())      # unseen tokens: one count
    tok, kv = x0[answer], k[answer]
    pos = torch.arange(L).expand_as(x0)[answer].double()
    tok_logf = logf[tok]
    # equal-count bins of the occurrences' log-frequency
    edges = torch.quantile(tok_logf, torch.linspace(0, 1, n_bins + 1, dtype=torch.float64))
    edges = torch.unique(edges)
    which = torch.bucketize(tok_logf, edges[1:-1], right=True)
    bins = []
    for b in range(len(edges) - 1):
        sel = which == b
        if sel.any():
            m, se, c = _mean_se(kv[sel])
            bins.append({"log10_freq_lo": float(edges[b]), "log10_freq_hi": float(edges[b + 1]),
                         "log10_freq_median": float(tok_logf[sel].median()), "k_mean": m, "k_se": se, "count": c})

    kinds = token_kinds(task.tokenizer) if hasattr(task, "tokenizer") else ["other"] * task.vocab_size
    tok_kind = [kinds[i] for i in tok.tolist()]
    by_kind = {}
    for kind in TOKEN_KINDS:
        sel = torch.tensor([t == kind for t in tok_kind], dtype=torch.bool)
        if sel.any():
            m, se, c = _mean_se(kv[sel])
            by_kind[kind] = {"k_mean": m, "k_se": se, "count": c, "share": c / len(tok_kind),
                             "reveal_time": m / (m + 1)}
    # per distinct token: mean k (for the scatter under the binned curve)
    uniq, inv = torch.unique(tok, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, kv)
    occ = torch.bincount(inv, minlength=len(uniq)).double()
    examples = {}
    for kind in TOKEN_KINDS:  # a few decoded examples per kind, most frequent first, for the table
        ids = [i for i in torch.argsort(counts, descending=True).tolist() if kinds[i] == kind and counts[i] > 0][:5]
        examples[kind] = [task.tokenizer.decode([i]) if hasattr(task, "tokenizer") else str(i) for i in ids]
    return {
        "split": split, "rows": int(len(x0)), "tokens": int(answer.sum()), "seq_len": int(L),
        "c1": float(model.c1), "c2": float(model.c2),
        "k_mean": float(kv.mean()), "k_std": float(kv.std()) if kv.numel() > 1 else 0.0,
        "k_min": float(kv.min()), "k_max": float(kv.max()),
        "by_position": by_position, **reveal,
        "spearman_k_vs_position": _spearman(kv, pos),
        "spearman_k_vs_log_freq": _spearman(kv, tok_logf),
        "by_frequency": bins,
        "by_kind": by_kind, "kind_examples": examples,
        "per_token": {"log10_freq": logf[uniq].tolist(), "k_mean": (sums / occ).tolist(), "count": occ.tolist()},
    }


def _plots(s: Dict[str, object], out: Path, title: str) -> Dict[str, str]:
    import matplotlib  # lazy: matplotlib is heavy and only the plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib is heavy and only the plots need it

    paths = {}
    pos = s["by_position"]
    L = len(pos["k_mean"])
    x = list(range(L))
    m, sd = torch.tensor(pos["k_mean"]), torch.tensor(pos["k_std"])
    reveal = pos.get("sample_reveal_rank")
    fig, axes = plt.subplots(2 if reveal else 1, 1, figsize=(7, 5.4 if reveal else 3.2), sharex=True, squeeze=False)
    ax = axes[0][0]
    ax.plot(x, m.tolist(), label="k_φ(x) on real rows (mean ± sd)")
    ax.fill_between(x, (m - sd).tolist(), (m + sd).tolist(), alpha=0.25)
    ax.axhline(s["c1"], color="grey", lw=0.6)
    ax.set_ylabel("exponent k (velocity k/t)")
    ax.set_title(f"{title}: learned exponent by position (large k = generated early)", fontsize=9)
    ax.legend(fontsize=7)
    if reveal:
        ax = axes[1][0]
        ax.plot(x, reveal, color="tab:orange")
        ax.axhline(0.5, color="grey", lw=0.6)
        ax.set_ylabel("reveal rank (0 = first)")
        ax.set_title(f"when its sampler revealed each position ({s.get('n_samples', '?')} samples, mean rank)", fontsize=9)
    axes[-1][0].set_xlabel("position in the sequence")
    fig.tight_layout()
    paths["position"] = "lomdm_velocity_position.png"
    fig.savefig(out / paths["position"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.2))
    pt = s["per_token"]
    ax.scatter([10 ** v for v in pt["log10_freq"]], pt["k_mean"], s=4, alpha=0.25, color="grey",
               label="one token type (mean over its occurrences)")
    bins = s["by_frequency"]
    ax.errorbar([10 ** b["log10_freq_median"] for b in bins], [b["k_mean"] for b in bins],
                yerr=[0 if math.isnan(b["k_se"]) else 2 * b["k_se"] for b in bins], marker="o",
                label="equal-count bins of occurrences (± 2 s.e.)")
    ax.set_xscale("log")
    ax.set_xlabel("training-split unigram frequency of the token")
    ax.set_ylabel("exponent k")
    ax.set_title(f"{title}: k vs token frequency (Spearman {s['spearman_k_vs_log_freq']:.2f})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths["frequency"] = "lomdm_velocity_frequency.png"
    fig.savefig(out / paths["frequency"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3))
    kinds = list(s["by_kind"])
    vals = [s["by_kind"][k_]["k_mean"] for k_ in kinds]
    errs = [0 if math.isnan(s["by_kind"][k_]["k_se"]) else 2 * s["by_kind"][k_]["k_se"] for k_ in kinds]
    ax.errorbar(range(len(kinds)), vals, yerr=errs, fmt="o", capsize=3)  # points: the differences are small
    ax.set_xticks(range(len(kinds)))
    ax.set_xticklabels([f"{k_}\n{s['by_kind'][k_]['share']:.0%}" for k_ in kinds], fontsize=8)
    ax.axhline(s["c1"], color="grey", lw=0.6)
    ax.set_ylabel("mean exponent k (± 2 s.e.)")
    ax.set_title(f"{title}: k by token kind", fontsize=9)
    fig.tight_layout()
    paths["kind"] = "lomdm_velocity_kind.png"
    fig.savefig(out / paths["kind"], dpi=110)
    plt.close(fig)
    return paths


def velocity_markdown(s: Dict[str, object], paths: Dict[str, str], title: str = "LoMDM", prefix: str = "") -> str:
    """A short section: what the exponents are, the table by kind, the three plots (linked as
    ``prefix + file name``)."""
    lines = [f"### What the learned order learned ({title})", "",
             f"Exponents k_φ of {s['rows']} real {s['split']} rows ({s['tokens']} tokens; c1 = {s['c1']:g}, "
             f"c2 = {s['c2']:g}, so k ∈ ({s['c1'] - s['c2']:g}, {s['c1'] + s['c2']:g})): mean {s['k_mean']:.3f}, "
             f"sd {s['k_std']:.3f}, range {s['k_min']:.3f}–{s['k_max']:.3f}. A position's reverse unmasking rate is "
             "k/t, so **a larger k is generated earlier** (expected reveal time k/(k+1), 1 = first). "
             f"Spearman ρ(k, position) = {s['spearman_k_vs_position']:.3f}; "
             f"ρ(k, log train frequency) = {s['spearman_k_vs_log_freq']:.3f}."
             + (f" In its own {s['n_samples']} samples the sampler revealed positions with "
                f"ρ(reveal rank, position) = {s['spearman_reveal_vs_position']:.3f} (1 = left to right)."
                if "n_samples" in s else ""), "",
             "| token kind | share of tokens | mean k ± s.e. | expected reveal time | most frequent examples |",
             "|---|---|---|---|---|"]
    for kind, d in s["by_kind"].items():
        ex = ", ".join(repr(e) for e in s["kind_examples"].get(kind, []))
        lines.append(f"| {kind} | {d['share']:.1%} | {d['k_mean']:.4f} ± {d['k_se']:.4f} | "
                     f"{d['reveal_time']:.4f} | {ex} |")
    lines += ["", "| train frequency bin (log10) | tokens | mean k ± s.e. |", "|---|---|---|"]
    for b in s["by_frequency"]:
        lines.append(f"| {b['log10_freq_lo']:.2f} .. {b['log10_freq_hi']:.2f} | {b['count']} | "
                     f"{b['k_mean']:.4f} ± {b['k_se']:.4f} |")
    lines += [""] + [f"![{name}]({prefix}{p})" for name, p in paths.items()] + [""]
    return "\n".join(lines)


def plot_lomdm_velocity(run_dir: Union[str, Path], out_dir: Union[str, Path], split: str = "test", n: int = 256,
                        exp=None, title: Optional[str] = None,
                        finalize_steps: Optional[torch.Tensor] = None) -> Dict[str, object]:
    """PNGs (velocity by position, by frequency, by token kind) + ``lomdm_velocity.md`` /
    ``.json`` in ``out_dir`` for a run with order ``learned``. Returns the summary with
    ``paths`` (file names relative to ``out_dir``) and ``markdown`` (the section).
    ``finalize_steps`` [N, L] (the decoding traces of the run's samples) adds when its sampler
    revealed each position."""
    exp = exp if exp is not None else load_run(run_dir)
    if not has_learned_order(exp.model):
        raise ValueError(f"{run_dir} has order {exp.order.name!r}; plot_lomdm_velocity needs order 'learned'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = title or Path(run_dir).name
    s = velocity_summary(exp, split=split, n=n, finalize_steps=finalize_steps)
    paths = _plots(s, out, title)
    md = velocity_markdown(s, paths, title)
    (out / "lomdm_velocity.md").write_text(md)
    (out / "lomdm_velocity.json").write_text(json.dumps({**s, "paths": paths}, indent=1))
    return {**s, "paths": paths, "markdown": md}
