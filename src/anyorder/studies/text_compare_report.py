"""The table and Markdown report of :func:`anyorder.studies.text_compare.compare_runs`.

``table_rows`` turns the comparison's JSON into one row of strings per run (:data:`COLUMNS`);
``markdown`` writes ``text_compare.md``: the table, the real-test-rows reference line, what each
column means, and the first sample of each run.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence


def _ppl(res) -> str:
    if res is None:
        return "—"
    if res["bound"] == "exact NLL":
        return f"= {res['ppl']:.1f}"
    if math.isnan(res["stderr"]):
        return f"≤ {res['ppl']:.1f}"
    return f"≤ {res['ppl']:.1f} ({res['ppl_low']:.1f}–{res['ppl_high']:.1f})"


def _si(v) -> str:
    if v is None:
        return "—"
    for unit, f in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= f:
            return f"{v / f:.3g}{unit}"
    return f"{v:.3g}"


COLUMNS = ("run", "order", "params", "train FLOPs", "steps", "test PPL", "zero-shot PPL", "gen PPL (judge)",
           "sampler: steps / NFE", "unigram H (samples)")


def table_rows(result: Dict[str, object]) -> List[Dict[str, str]]:
    """One dict per run with the :data:`COLUMNS` of the Markdown table (as strings)."""
    out = []
    for r in result["rows"]:
        g = r["generation"]
        heads = r["params"] - r["params_backbone"]
        out.append({
            "run": r["label"] + (" (judge)" if r["judge_is_this_run"] else ""),
            "order": r["order"],
            "params": _si(r["params_backbone"]) + (f" (+{_si(heads)} heads)" if heads else ""),
            "train FLOPs": _si(r["flops"]),
            "steps": "—" if r["steps"] is None else str(r["steps"]),
            "test PPL": _ppl(r["test"]),
            "zero-shot PPL": _ppl(r["zero_shot"]),
            "gen PPL (judge)": f"{g['gen_ppl']:.1f} ({g['gen_ppl_low']:.1f}–{g['gen_ppl_high']:.1f})",
            "sampler: steps / NFE": f"{g['decoder']['name']}: {g['steps']} / {g['nfe_mean']:.1f}",
            "unigram H (samples)": f"{g['unigram_entropy']:.3f}",
        })
    return out


def markdown(result: Dict[str, object], sections: Sequence[str] = ()) -> str:
    s, t, ref, j = result["settings"], result["task"], result["reference"], result["judge"]
    lines = ["# Orders compared on text", "",
             f"Task: {t['name']}, seq_len {t['seq_len']} ({t['mode']}), sources {t['sources']}, "
             f"zero-shot {t['zero_shot']}, tokenizer {t['tokenizer']}.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in table_rows(result):
        lines.append("| " + " | ".join(r[c] for c in COLUMNS) + " |")
    rj = ref.get("judge")
    ref_ppl = f"{rj['gen_ppl']:.1f} ({rj['gen_ppl_low']:.1f}–{rj['gen_ppl_high']:.1f})" if rj else "—"
    lines.append("| real test rows | — | — | — | — | — | — | " + ref_ppl + f" | — | {ref['unigram_entropy']:.3f} |")
    flops = [r["flops"] for r in result["rows"] if r["flops"]]
    spread = (max(flops) / min(flops) - 1) if flops else float("nan")
    lines += ["",
              f"- **PPL**: `=` exact NLL (AR); `≤` the NELBO upper bound of a diffusion order (LoMDM: its "
              f"L_main + L_velocity), mean of {s['mc']} Monte-Carlo replicates (stratified t, fresh masks), "
              f"range = ±2 standard errors; {s['n'] or 'all'} rows of each split, spread over it.",
              f"- **gen PPL**: {s['samples']} sequences per run decoded from all-mask at temperature 1 (float64 "
              f"Gumbel-max) by each order's own sampler, step budget {s['steps'] or 'seq_len'} (AR: seq_len); "
              f"scored by the exact NLL of the AR judge `{j['run_dir']}` ({_si(j['params'])} parameters, "
              f"{j['steps']} steps). The *real test rows* line is the judge on {ref['rows']} real rows: the "
              f"level a sampler matching the data would get. Range = ±2 standard errors over the sequences. "
              f"NFE = forward passes per sequence (mean).",
              f"- **unigram H**: entropy (nats) of each sequence's token histogram, mean over sequences; far "
              f"below the real rows' value = repetitive samples (a low gen PPL then means little).",
              f"- **equal compute**: training FLOPs differ by {spread:.1%} between the largest and the smallest run."
              if flops else "- training FLOPs: not recorded",
              f"- seed {s['seed']} (likelihood replicates and sample seeds; sample i uses the same seed in "
              f"every run), {s['threads']} thread(s)."]
    for r in result["rows"]:
        if r["test"] is not None and "velocity_per_token" in r["test"]:
            lines.append(f"- {r['label']}: of its test NELBO {r['test']['nelbo_per_token']:.4f} nats/token, "
                         f"{r['test']['velocity_per_token']:.4f} is the velocity term (the sampler's k̂_ψ vs k_φ).")
    if any(r["judge_is_this_run"] for r in result["rows"]):
        lines.append("- the judge is one of the compared runs: its own gen PPL is self-judged (optimistic).")
    lines += ["", "Samples (the first of each run, decoded):", ""]
    for r in result["rows"]:
        ex = r["generation"].get("example")
        if ex is not None:
            lines.append(f"- **{r['label']}**: `{ex[:300].replace(chr(10), ' ').replace('`', chr(39))}`")
    lines.append("")
    return "\n".join(lines + list(sections))
