"""lm-evaluation-harness adapter: standard benchmarks with any anyorder decoder, plus AFP and τ.

The measurement of "Parallelism and Generation Order in Masked Diffusion Language Models:
Limits Today, Potential Tomorrow" in one command: a task's accuracy next to how the model
decoded it — Average Finalization Parallelism and Kendall's τ_b of the finalisation order,
averaged per task.

Two layers:

- :class:`DecodeCore` (needs only torch and a tokenizer): request -> decode -> text + stats.
  ``generate`` builds ``prompt ⊕ [MASK] * gen_length`` per request, decodes same-length
  prompts together (no padding, so a batch decodes exactly as its rows one by one; row i uses
  seed ``seed + i``, i its index in the request list), cuts the answer at the first stop token
  (EOS) and at the task's ``until`` strings, and records per request the trace's AFP, τ_b and NFE.
  ``loglikelihood`` is the random-masking ELBO estimated by Monte Carlo (LLaDA's estimator: Nie
  et al., 2025, arXiv 2502.09992).
- :class:`AnyOrderLM`, registered in lm_eval's model registry as ``"anyorder"`` when lm_eval is
  installed; :func:`evaluate` runs ``lm_eval.simple_evaluate`` and adds the per-task stats;
  ``python -m anyorder.adapters.lm_eval --model_args ... --tasks ...`` prints the table.

What the harness's ``gen_kwargs`` mean here: ``until`` and ``max_gen_toks`` (the generation
length, unless ``gen_length`` is set) are honoured; sampling (``temperature``, ``do_sample``) is
the decoder's business: set it in the decoder spec (``decoder.temperature=0.7``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..decoding import build_decoder
from ..decoding.trace import afp, kendall_tau_b
from ..orders import build_order
from ..orders.random import RandomOrder
from .hf import load_hf_model, masked_batch

STATS_SCOPES = ("all", "before_eos")


@dataclass
class GenRequest:
    context: str
    gen_kwargs: dict
    task: str = ""
    doc_id: int = -1


def _spec(name, options: dict):
    return dict(name=name, **options) if options else name


class DecodeCore:
    """The harness-independent part: decode requests, score continuations, keep per-request stats.

    model:        anything with anyorder's forward and ``cfg.mask_id`` (a Transformer, an HF adapter)
    decoder:      a decoder spec (``"margin"`` or ``{"name": "top_prob", "k": 2}``)
    order:        an order spec; HF models in attention='full' need ``"random"``
    gen_length:   answer tokens per request (default: the request's ``max_gen_toks``, else 256)
    stats_scope:  ``"all"`` answer positions, or ``"before_eos"`` (those before the first stop token)
    stop_token_ids: ids that end an answer (default: the tokenizer's EOS)
    """

    def __init__(self, model, tokenizer, decoder="top_prob", order="random", gen_length: Optional[int] = None,
                 batch_size: int = 1, seed: int = 0, stats_scope: str = "all",
                 stop_token_ids: Optional[Sequence[int]] = None, add_special_tokens: Optional[bool] = None,
                 mc_samples: int = 32, default_gen_length: int = 256):
        if stats_scope not in STATS_SCOPES:
            raise ValueError(f"unknown stats_scope {stats_scope!r}. Valid choices: {', '.join(STATS_SCOPES)}")
        if int(batch_size) < 1 or int(mc_samples) < 1:
            raise ValueError(f"batch_size and mc_samples must be >= 1, got {batch_size}, {mc_samples}")
        self.model, self.tokenizer = model, tokenizer
        self.decoder = build_decoder(decoder)      # validates the spec now, not at the first request
        self.order = build_order(order)
        self.gen_length = None if gen_length is None else int(gen_length)
        self.batch_size, self.seed, self.stats_scope = int(batch_size), int(seed), stats_scope
        eos = getattr(tokenizer, "eos_token_id", None)
        self.stop_token_ids = set(stop_token_ids if stop_token_ids is not None else ([] if eos is None else [eos]))
        self.add_special_tokens = add_special_tokens
        self.mc_samples, self.default_gen_length = int(mc_samples), int(default_gen_length)
        self.records: List[dict] = []

    # -- tokens ---------------------------------------------------------------------------
    def encode(self, text: str, special: Optional[bool] = None) -> List[int]:
        special = self.add_special_tokens if special is None else special
        kw = {} if special is None else {"add_special_tokens": bool(special)}
        return list(self.tokenizer(text, **kw)["input_ids"])

    # -- generate_until -------------------------------------------------------------------
    def generate(self, requests: Sequence[GenRequest]) -> List[str]:
        """Texts, in request order; appends one stats record per request to ``self.records``."""
        ids = [self.encode(r.context) for r in requests]
        lengths = [self.gen_length or int(r.gen_kwargs.get("max_gen_toks") or self.default_gen_length)
                   for r in requests]
        groups: Dict[Tuple[int, int], List[int]] = defaultdict(list)
        for i, (p, n) in enumerate(zip(ids, lengths)):
            groups[(len(p), n)].append(i)
        texts: List[Optional[str]] = [None] * len(requests)
        records: List[Optional[dict]] = [None] * len(requests)
        for (_, n), members in groups.items():
            for s in range(0, len(members), self.batch_size):
                chunk = members[s:s + self.batch_size]
                x, answer = masked_batch([ids[i] for i in chunk], n, self.model.cfg.mask_id)
                res = self.decoder.decode(self.model, self.order, x, answer, row_seeds=[self.seed + i for i in chunk])
                for b, i in enumerate(chunk):
                    texts[i], records[i] = self._finish(requests[i], res, b, answer[b])
        self.records.extend(records)
        return texts

    def _finish(self, req: GenRequest, res, b: int, answer: torch.Tensor) -> Tuple[str, dict]:
        gen = res.tokens[b][answer].tolist()
        cut = next((j for j, t in enumerate(gen) if t in self.stop_token_ids), len(gen))
        text = self.tokenizer.decode(gen[:cut], skip_special_tokens=True)
        until = req.gen_kwargs.get("until") or []
        for stop in [until] if isinstance(until, str) else until:
            if stop:
                text = text.split(stop)[0]
        scope = answer.clone()
        if self.stats_scope == "before_eos":      # only the positions that made it into the answer
            pos = answer.nonzero().squeeze(-1)
            scope[pos[cut:]] = False
        step = res.trace.finalize_step[b:b + 1]
        tau = float(kendall_tau_b(step, scope.unsqueeze(0))[0])
        return text, {"task": req.task, "doc_id": req.doc_id, "afp": float(afp(step, scope.unsqueeze(0))[0]),
                      "kendall_tau": tau, "nfe": int(res.trace.nfe[b]), "answer_tokens": cut, "text": text}

    def task_stats(self) -> Dict[str, dict]:
        return task_stats(self.records)

    # -- loglikelihood --------------------------------------------------------------------
    def _pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        # The harness's convention: trailing spaces of the context belong to the continuation, and
        # the continuation's ids are those of the whole string after the context's.
        n_space = len(context) - len(context.rstrip())
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]

    @torch.no_grad()
    def loglikelihood(self, pairs: Sequence[Tuple[str, str]]) -> List[Tuple[float, bool]]:
        """``(ELBO estimate of log p(continuation | context), one-step greedy)`` per pair.

        Estimator (LLaDA's): for sample s draw k_s from {1..n} (stratified over the samples), mask k_s
        of the n continuation tokens uniformly at random, and average (n / k_s) Σ_masked log p(x_i).
        Its expectation is the random-masking ELBO, a lower bound on log p. ``is_greedy``: with
        the whole continuation masked, the argmax at every position is the continuation token.
        Request i draws from seed ``seed + i``.
        """
        if not isinstance(self.order, RandomOrder):  # this estimator is its NELBO, not another order's
            raise NotImplementedError(f"loglikelihood is the random-masking ELBO; order {self.order.name!r} "
                                      "has a different bound (use order=random)")
        mask_id, out = self.model.cfg.mask_id, []
        for i, (context, continuation) in enumerate(pairs):
            ctx, cont = self._pair(context, continuation)
            n = len(cont)
            if n == 0:
                out.append((0.0, True))
                continue
            x0 = torch.tensor(ctx + cont, dtype=torch.long)
            P, gen = len(ctx), torch.Generator().manual_seed(self.seed + i)
            full = x0.clone()
            full[P:] = mask_id
            logits = self.model(full.unsqueeze(0))[0, P:]
            greedy = bool((logits.argmax(-1) == x0[P:]).all())
            offset = int(torch.randint(n, (1,), generator=gen))
            terms = []
            for s0 in range(0, self.mc_samples, self.batch_size):
                rows = []
                for s in range(s0, min(s0 + self.batch_size, self.mc_samples)):
                    k = (s + offset) % n + 1
                    hide = torch.zeros(n, dtype=torch.bool)
                    hide[torch.randperm(n, generator=gen)[:k]] = True
                    rows.append((hide, k))
                x = x0.repeat(len(rows), 1)
                hide = torch.stack([h for h, _ in rows])
                x[:, P:] = torch.where(hide, torch.full_like(hide, mask_id, dtype=torch.long), x0[P:])
                logp = F.log_softmax(self.model(x)[:, P:].double(), dim=-1)
                tok_lp = logp.gather(-1, x0[P:].expand(len(rows), n).unsqueeze(-1)).squeeze(-1)
                for r, (h, k) in enumerate(rows):
                    terms.append(float(tok_lp[r][h].sum()) * n / k)
            out.append((sum(terms) / len(terms), greedy))
        return out


def task_stats(records: Sequence[dict]) -> Dict[str, dict]:
    """Per task: mean AFP, mean τ_b (over the requests where it is defined: τ is NaN when every
    token was finalised in one step), mean NFE, and the counts."""
    by_task: Dict[str, List[dict]] = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    out = {}
    for task, rs in by_task.items():
        taus = [r["kendall_tau"] for r in rs if not math.isnan(r["kendall_tau"])]
        out[task] = {"afp": sum(r["afp"] for r in rs) / len(rs),
                     "kendall_tau": sum(taus) / len(taus) if taus else float("nan"),
                     "nfe": sum(r["nfe"] for r in rs) / len(rs), "n": len(rs), "n_tau": len(taus)}
    return out


def _split_prefixed(kwargs: dict, prefix: str) -> dict:
    return {k[len(prefix):]: kwargs.pop(k) for k in list(kwargs) if k.startswith(prefix)}


def build_core(pretrained: Optional[str] = None, model=None, tokenizer=None, mask_token_id: Optional[int] = None,
               shift_logits: bool = False, trust_remote_code: bool = False, dtype="auto", device: Optional[str] = None,
               attention: str = "full", auto_class: str = "AutoModel", vocab_limit: Optional[int] = None,
               decoder: str = "top_prob", order: str = "random", **kwargs) -> DecodeCore:
    """A :class:`DecodeCore` from lm_eval-style flat arguments. ``decoder.X=v`` / ``order.X=v``
    keys become the decoder's / order's options (``decoder=top_prob,decoder.steps=256``)."""
    dec, ordr = _split_prefixed(kwargs, "decoder."), _split_prefixed(kwargs, "order.")
    kwargs.pop("max_batch_size", None)             # the harness always passes it; batching here is exact
    core_keys = {"gen_length", "batch_size", "seed", "stats_scope", "stop_token_ids", "add_special_tokens",
                 "mc_samples", "default_gen_length"}
    unknown = sorted(set(kwargs) - core_keys)
    if unknown:
        raise ValueError(f"unknown anyorder model_args {unknown}. Valid: pretrained, mask_token_id, shift_logits, "
                         f"trust_remote_code, dtype, device, attention, auto_class, vocab_limit, decoder, "
                         f"decoder.<option>, order, order.<option>, {', '.join(sorted(core_keys))}")
    if kwargs.get("batch_size") == "auto":
        raise ValueError("batch_size='auto' is not supported: give an integer")
    if model is None:
        if pretrained is None:
            raise ValueError("give pretrained=<hub id or local dir> (or a model object through the Python API)")
        model, tok = load_hf_model(pretrained, mask_token_id=mask_token_id, shift_logits=shift_logits,
                                   trust_remote_code=trust_remote_code, torch_dtype=dtype, device=device or "cpu",
                                   attention=attention, auto_class=auto_class, vocab_limit=vocab_limit)
        tokenizer = tokenizer or tok
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to turn requests into tokens")
    if isinstance(kwargs.get("stop_token_ids"), (int, str)):
        kwargs["stop_token_ids"] = [int(t) for t in str(kwargs["stop_token_ids"]).split(":")]
    return DecodeCore(model, tokenizer, decoder=_spec(decoder, dec), order=_spec(order, ordr), **kwargs)


# -- the lm_eval model class (only when lm_eval is installed) ------------------------------------
try:
    import lm_eval.models  # noqa: F401  (its lazy registrations first, so 'hf' & co. stay available)
    from lm_eval.api.model import LM as _LM
    from lm_eval.api.registry import register_model as _register_model

    HAVE_LM_EVAL = True
except ImportError:  # the core above still works; AnyOrderLM / evaluate need `pip install lm-eval`
    HAVE_LM_EVAL = False

if HAVE_LM_EVAL:
    class AnyOrderLM(_LM):
        """``lm_eval`` model "anyorder": model_args are :func:`build_core`'s arguments."""

        def __init__(self, **kwargs):
            super().__init__()
            self.core = build_core(**kwargs)

        def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
            return self.core.generate([GenRequest(r.args[0], dict(r.args[1] or {}), r.task_name or "", r.doc_id)
                                       for r in requests])

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self.core.loglikelihood([r.args for r in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("anyorder: loglikelihood_rolling (perplexity tasks) is not implemented; "
                                      "generation tasks and loglikelihood (multiple choice) are")

        @property
        def tokenizer_name(self) -> str:
            return str(getattr(self.core.tokenizer, "name_or_path", "anyorder")).replace("/", "__")

        def chat_template(self, chat_template=False):
            return getattr(self.core.tokenizer, "chat_template", None) or ""

        def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
            return self.core.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                           add_generation_prompt=add_generation_prompt)

    if __name__ != "__main__":  # `python -m` runs this file a second time as __main__: register one class
        _register_model("anyorder")(AnyOrderLM)


def evaluate(lm, tasks: Sequence[str], include_path: Optional[str] = None, include_defaults: bool = True,
             **simple_evaluate_kwargs) -> dict:
    """``lm_eval.simple_evaluate`` on an :class:`AnyOrderLM`, plus ``out["anyorder"]``: per-task
    AFP / τ_b / NFE (``per_task``) and one record per request (``requests``).
    ``include_defaults=False`` skips indexing the harness's own tasks (a slow start) when every
    task comes from ``include_path``."""
    if not HAVE_LM_EVAL:
        raise ImportError("lm-evaluation-harness is not installed: pip install 'anyorder[lm_eval]'")
    from lm_eval import simple_evaluate  # lazy: optional dependency (the 'lm_eval' extra)
    from lm_eval.tasks import TaskManager  # lazy: optional dependency (the 'lm_eval' extra)

    start = len(lm.core.records)
    tm = TaskManager(include_path=include_path, include_defaults=include_defaults) if include_path else None
    out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, **simple_evaluate_kwargs)
    records = lm.core.records[start:]
    out["anyorder"] = {"per_task": task_stats(records), "requests": records}
    return out


def summary_rows(out: dict) -> List[dict]:
    """One row per (task, metric): the harness's value next to the task's AFP, τ_b and NFE."""
    rows, stats = [], out.get("anyorder", {}).get("per_task", {})
    for task, metrics in out["results"].items():
        s = stats.get(task, {})
        for key, value in metrics.items():
            if "," not in key or key.split(",")[0].endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            rows.append({"task": task, "metric": key, "value": value, "afp": s.get("afp"),
                         "kendall_tau": s.get("kendall_tau"), "nfe": s.get("nfe"), "n": s.get("n")})
    return rows


def _fmt(v):
    return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m anyorder.adapters.lm_eval",
                                description="lm-evaluation-harness with an anyorder decoder; prints accuracy next to AFP and Kendall tau")
    p.add_argument("--model_args", required=True, help="e.g. pretrained=GSAI-ML/LLaDA-8B-Instruct,trust_remote_code=true,"
                                                      "dtype=bf16,device=cuda,decoder=top_prob,decoder.steps=256,decoder.window=32")
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--include_path", default=None, help="folder of extra task YAMLs")
    p.add_argument("--only_include_path", action="store_true",
                   help="index only the --include_path tasks, not the harness's own (faster start)")
    p.add_argument("--limit", type=float, default=None)
    p.add_argument("--num_fewshot", type=int, default=None)
    p.add_argument("--apply_chat_template", action="store_true")
    p.add_argument("--output", default=None, help="write the full results (with per-request stats) as JSON")
    a = p.parse_args(argv)
    if not HAVE_LM_EVAL:
        print("lm-evaluation-harness is not installed: pip install 'anyorder[lm_eval]'", file=sys.stderr)
        return 2
    from lm_eval.utils import simple_parse_args_string  # lazy: optional dependency (the 'lm_eval' extra)

    lm = AnyOrderLM(**simple_parse_args_string(a.model_args))
    limit = None if a.limit is None else (int(a.limit) if a.limit >= 1 else a.limit)
    out = evaluate(lm, a.tasks.split(","), include_path=a.include_path, include_defaults=not a.only_include_path,
                   limit=limit, num_fewshot=a.num_fewshot,
                   apply_chat_template=a.apply_chat_template, log_samples=False)
    cols = ["task", "metric", "value", "afp", "kendall_tau", "nfe", "n"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in summary_rows(out):
        print("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    if a.output:
        with open(a.output, "w") as f:
            json.dump({"results": out["results"], "anyorder": out["anyorder"], "model_args": a.model_args}, f,
                      indent=2, default=str)
    return 0


if __name__ == "__main__":
    from anyorder.adapters.lm_eval import main as _main  # lazy: `python -m` self-import (the registered class)

    sys.exit(_main())
