"""``chat``: supervised fine-tuning rows (prompt/response or chat JSONL) for Hugging Face models.

    task: {name: chat, path: data/examples/chat.jsonl, tokenizer: MODEL_DIR, seq_len: 256}

Each row is rendered with the tokenizer's own chat template (:mod:`anyorder.data.chat_format`)
into prompt ids then response ids. The answer positions, the only ones an objective masks and
scores, are the response tokens; the loss is normalised by their count.

Layout of a row (``seq_len`` ids):

- ``pack: false`` (default): one conversation, then ``pad_id`` to the end. With ``pad_as:
  context`` (default) the pads are prompt positions: never masked, never scored, visible as clean
  tokens (as in every order, prompt positions are); with ``pad_as: answer`` they are answer
  positions whose target is the pad id, so the model learns to close a fixed-length answer with
  pads, LLaDA's |EOS| filling (Nie et al., 2025, arXiv 2502.09992, §2.3).
- ``pack: true``: conversations back to back (first fit among the last 64 rows, in file order) so
  fewer positions are pads; the conversations of a row see each other (no document mask), and each one's response
  tokens are its answer positions.

A conversation longer than ``seq_len`` keeps its first ``seq_len`` ids (the response is cut) and is
counted in ``truncated``; one whose prompt alone fills the row has no answer left and is counted
in ``dropped``. Both counts are in :meth:`describe` (the run's ``run.json``). Rows go to the
validation split by a hash of their text (``val_frac``). ``hub: {path: ID, name: ..., split:
...}`` reads a dataset through ``datasets.load_dataset`` instead of ``path`` (a network for a
hub id; ``{path: json, data_files: FILE}`` is local).

The mask id is the tokenizer's mask token, else ``mask_id``, else a ``[MASK]`` token added to the
tokenizer (its id is the next free one; the model's embeddings grow where they must). The
tokenizer (with the added token) is kept as ``hf_tokenizer``: ``anyorder export`` saves it.
"""
from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..checks import check_bool, check_choice, check_float, check_int, check_mapping, show
from ..data.chat_format import load_tokenizer, read_hub, read_jsonl, render
from .base import TASKS, Task

PAD_AS = ("context", "answer")
PACK_WINDOW = 64   # packing looks for room in the last this-many rows only


@TASKS.register("chat")
class ChatTask(Task):
    name = "chat"

    def __init__(self, path: Optional[str] = None, tokenizer: Optional[str] = None, seq_len: int = 256,
                 pack: bool = False, pad_as: str = "context", val_frac: float = 0.1, mask_id: Optional[int] = None,
                 pad_id: Optional[int] = None, hub: Optional[Dict[str, Any]] = None, max_rows: Optional[int] = None):
        if (path is None) == (hub is None):
            raise ValueError(f"task 'chat' needs exactly one of task.path (a local JSONL file) and task.hub "
                             f"(datasets.load_dataset arguments), got path={show(path)}, hub={show(hub)}")
        self.seq_len = check_int("task.seq_len", seq_len, 2)
        self.pack, self.pad_as = check_bool("task.pack", pack), check_choice("task.pad_as", pad_as, PAD_AS)
        self.val_frac = check_float("task.val_frac", val_frac, 0, 1, hi_open=True)
        max_rows = None if max_rows is None else check_int("task.max_rows", max_rows, 1)
        self.tokenizer_path = tokenizer
        tok = self.hf_tokenizer = load_tokenizer(tokenizer, "task.tokenizer")
        self.mask_id = self._mask_id(tok, mask_id)
        self.pad_id = self._pad_id(tok, pad_id)
        self.vocab_size = max(len(tok), self.mask_id + 1, self.pad_id + 1)
        self.source = path if hub is None else check_mapping("task.hub", hub)
        self.template = "chat_template" if getattr(tok, "chat_template", None) else "plain"
        rows = read_jsonl(path) if hub is None else read_hub(hub)
        split: Dict[str, List[Tuple[List[int], List[int]]]] = {"train": [], "validation": []}
        self.truncated = self.dropped = 0
        for k, (where, turns) in enumerate(rows):
            if max_rows is not None and k >= max_rows:
                break
            try:
                p, r = render(tok, turns)
            except Exception as exc:  # the template is the tokenizer's own Jinja code: any error, one line
                raise ValueError(f"{where}: the tokenizer's chat template cannot render this row: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
            if len(p) >= self.seq_len:
                self.dropped += 1
                continue
            if len(p) + len(r) > self.seq_len:
                self.truncated += 1
                r = r[: self.seq_len - len(p)]
            key = hashlib.sha256(repr(turns).encode()).digest()[:8]
            held_out = int.from_bytes(key, "big") / 2.0 ** 64 < self.val_frac
            split["validation" if held_out else "train"].append((p, r))
        if not split["train"]:
            raise ValueError(f"task 'chat': no training rows in {show(self.source)} (after {self.dropped} dropped "
                             f"whose prompt fills task.seq_len={self.seq_len} and the validation split)")
        self.n_rows = {s: len(v) for s, v in split.items()}
        self._rows = {s: self._layout(v) for s, v in split.items() if v}

    @staticmethod
    def _mask_id(tok, mask_id) -> int:
        if mask_id is not None:
            return check_int("task.mask_id", mask_id, 0)
        if getattr(tok, "mask_token_id", None) is None:
            tok.add_special_tokens({"mask_token": "[MASK]"})   # a new id: len(tok) - 1
        return int(tok.mask_token_id)

    @staticmethod
    def _pad_id(tok, pad_id) -> int:
        if pad_id is not None:
            return check_int("task.pad_id", pad_id, 0)
        for name in ("pad_token_id", "eos_token_id"):
            if getattr(tok, name, None) is not None:
                return int(getattr(tok, name))
        raise ValueError("task 'chat': the tokenizer has neither a pad nor an EOS token; set task.pad_id")

    def _layout(self, rows: List[Tuple[List[int], List[int]]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x0 [N, seq_len], answer [N, seq_len]) of rendered (prompt, response) pairs."""
        L = self.seq_len
        groups: List[List[Tuple[List[int], List[int]]]] = []
        fill: List[int] = []
        for p, r in rows:   # first fit in file order; without packing every conversation opens a row
            n = len(p) + len(r)
            lo = max(0, len(fill) - PACK_WINDOW)   # bounded work per conversation on large files
            k = next((i for i in range(lo, len(fill)) if fill[i] + n <= L), None) if self.pack else None
            if k is None:
                groups.append([])
                fill.append(0)
                k = len(groups) - 1
            groups[k].append((p, r))
            fill[k] += n
        x0 = torch.full((len(groups), L), self.pad_id, dtype=torch.long)
        answer = torch.zeros(len(groups), L, dtype=torch.bool)
        for b, group in enumerate(groups):
            at = 0
            for p, r in group:
                x0[b, at: at + len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
                answer[b, at + len(p): at + len(p) + len(r)] = True
                at += len(p) + len(r)
            if self.pad_as == "answer":
                answer[b, at:] = True
        return x0, answer

    # -- the Task interface ------------------------------------------------------------------
    def rows(self, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
        if split not in self._rows:
            raise ValueError(f"task 'chat' has no {split!r} rows (task.val_frac={self.val_frac} of "
                             f"{sum(self.n_rows.values())} conversations); raise task.val_frac or add rows")
        return self._rows[split]

    def train_batch(self, batch_size, gen):
        x0, answer = self.rows("train")
        idx = torch.randint(len(x0), (batch_size,), generator=gen)
        return x0[idx], answer[idx]

    def eval_set(self, n):
        x0, answer = self.rows("validation")
        return x0[:n], answer[:n]

    def metrics(self, pred, x0, answer):
        return {"token_acc": float(((pred == x0) & answer).sum() / answer.sum().clamp_min(1)),
                "seq_acc": float(((pred == x0) | ~answer).all(-1).double().mean())}

    def headline(self):
        return "token_acc"

    def decode_text(self, ids) -> str:
        return self.hf_tokenizer.decode([int(i) for i in ids])

    def token_str(self, token: int) -> str:
        return "[MASK]" if token == self.mask_id else self.decode_text([token])

    def describe(self):
        out = super().describe()
        out.update({"source": self.source, "tokenizer": self.tokenizer_path, "template": self.template,
                    "mask_id": self.mask_id, "pad_id": self.pad_id, "pack": self.pack, "pad_as": self.pad_as,
                    "conversations": dict(self.n_rows), "truncated": self.truncated, "dropped": self.dropped,
                    "answer_tokens": {s: int(a.sum()) for s, (_, a) in self._rows.items()}})
        return out
