"""``text``: language modelling on real English.

    task: {name: text, sources: [wiki, shakespeare], zero_shot: [bible],
           tokenizer: {name: bpe, vocab_size: 8192}, seq_len: 128, mode: packed}

Rows are packed documents (every position scored) or padded documents (``mode: padded``,
pads unscored); ``answer`` is the scored mask. Splits: ``train``/``validation``/``test`` come
from the ``sources`` by document hash; ``zero_shot`` is the ``zero_shot_split`` of the
held-out ``zero_shot`` sources, which neither the model nor the BPE tokenizer ever sees.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from ..data import build_corpus, build_tokenizer, default_cache_dir, pack, pad_rows, split_documents
from ..data.corpus import SPLITS
from ..data.encode import concat, encode_corpus
from ..checks import check_bool, check_choice, check_float, check_int, show
from .base import TASKS, Task

MODES = ("packed", "padded")
EVAL_SPLITS = SPLITS + ("zero_shot",)


@TASKS.register("text")
class TextTask(Task):
    name = "text"

    def __init__(self, sources=("wiki", "shakespeare"), zero_shot=("bible",), tokenizer=None,
                 seq_len: int = 128, mode: str = "packed", val_frac: float = 0.05, test_frac: float = 0.05,
                 zero_shot_split: str = "test", truncate: bool = False, cache_dir: Optional[str] = None):
        check_choice("task.mode", mode, MODES)
        check_choice("task.zero_shot_split", zero_shot_split, SPLITS + ("all",))
        seq_len = check_int("task.seq_len", seq_len, 2)
        val_frac, test_frac = check_float("task.val_frac", val_frac, 0, 1), check_float("task.test_frac", test_frac, 0, 1)
        if val_frac + test_frac >= 1:
            raise ValueError(f"task.val_frac + task.test_frac must be < 1 (the rest trains), got {val_frac} + {test_frac}")
        check_bool("task.truncate", truncate)
        if cache_dir is not None and not isinstance(cache_dir, str):
            raise ValueError(f"task.cache_dir must be a folder path or null, got {show(cache_dir)}")
        if not isinstance(sources, (str, dict, list, tuple)) or not isinstance(zero_shot, (str, dict, list, tuple, type(None))):
            raise ValueError(f"task.sources and task.zero_shot must be a corpus name, a {{name: ...}} spec or a list "
                             f"of them, got {show(sources)} and {show(zero_shot)}")
        sources = [sources] if isinstance(sources, (str, dict)) else list(sources)
        zero_shot = [zero_shot] if isinstance(zero_shot, (str, dict)) else list(zero_shot or [])
        if not sources:
            raise ValueError("the text task needs at least one training source")
        self.corpora = [build_corpus(s) for s in sources]
        self.held_out = [build_corpus(s) for s in zero_shot]
        names = [c.fingerprint() for c in self.corpora]
        overlap = set(names) & {c.fingerprint() for c in self.held_out}
        if overlap:
            raise ValueError(f"a zero-shot source cannot also be a training source: {sorted(overlap)}")
        self.seq_len, self.mode, self.truncate = int(seq_len), mode, bool(truncate)
        self.val_frac, self.test_frac, self.zero_shot_split = float(val_frac), float(test_frac), zero_shot_split
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()

        docs: Dict[str, dict] = {}  # corpus fingerprint -> split documents, read at most once

        def split_docs(c):
            key = c.fingerprint()
            if key not in docs:
                docs[key] = split_documents(c, self.val_frac, self.test_frac)
            return docs[key]

        corpus_key = json.dumps([sorted(names), self.val_frac, self.test_frac])
        train_texts = lambda: (d.text for c in self.corpora for d in split_docs(c)["train"])  # noqa: E731
        self.tokenizer = build_tokenizer(tokenizer or {"name": "bpe", "vocab_size": 8192}, texts=train_texts,
                                         corpus_key=corpus_key, cache_dir=self.cache_dir)
        self.vocab_size, self.mask_id = self.tokenizer.vocab_size, self.tokenizer.mask_id

        def encoded(c):  # reads the documents only if the encoded cache misses
            return encode_corpus(c, self.tokenizer, self.val_frac, self.test_frac, self.cache_dir,
                                 docs=docs.get(c.fingerprint()))

        enc = [encoded(c) for c in self.corpora]
        self.encoded = {s: concat(e[s] for e in enc) for s in SPLITS}
        if self.held_out:
            zs = [encoded(c) for c in self.held_out]
            parts = SPLITS if zero_shot_split == "all" else (zero_shot_split,)
            self.encoded["zero_shot"] = concat(e[s] for e in zs for s in parts)
        self._rows: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}

    # -- rows ------------------------------------------------------------------------------
    def rows(self, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """All rows of a split: (x0 [N, L] long, answer [N, L] bool)."""
        if split not in self.encoded:
            valid = list(self.encoded)
            raise ValueError(f"unknown split {split!r} for this text task; valid: {', '.join(valid)}"
                             + ("" if self.held_out else " (zero_shot needs task.zero_shot sources)"))
        if split not in self._rows:
            flat, offsets = self.encoded[split]
            tk = self.tokenizer
            if len(offsets) < 2:
                raise ValueError(f"split {split!r} holds no documents (val_frac/test_frac too small for this corpus?)")
            if self.mode == "packed":
                x0 = pack(flat, offsets, self.seq_len, tk.eos_id, tk.bos_id)
                answer = torch.ones_like(x0, dtype=torch.bool)
            else:
                x0, answer = pad_rows(flat, offsets, self.seq_len, tk.eos_id, tk.pad_id, tk.bos_id, self.truncate)
            self._rows[split] = (x0, answer)
        return self._rows[split]

    def split_set(self, split: str, n: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``n`` rows spread evenly over the split (all rows if ``n`` is None or larger): the
        same rows every call, drawn from the whole split rather than its first documents."""
        x0, answer = self.rows(split)
        if n is None or n >= len(x0):
            return x0, answer
        idx = torch.linspace(0, len(x0) - 1, int(n)).round().long()
        return x0[idx], answer[idx]

    def train_batch(self, batch_size, gen):
        x0, answer = self.rows("train")
        idx = torch.randint(len(x0), (batch_size,), generator=gen)
        return x0[idx], answer[idx]

    def eval_set(self, n):
        return self.split_set("validation", n)

    # -- reporting -------------------------------------------------------------------------
    def metrics(self, pred, x0, answer):
        return {"token_acc": float(((pred == x0) & answer).sum() / answer.sum().clamp_min(1))}

    def headline(self):
        return "token_acc"

    def decode_text(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def parse(self, s: str) -> torch.Tensor:
        """A text prompt -> a row: its tokens, then [MASK] up to ``seq_len`` (the answer to decode)."""
        ids = self.tokenizer.encode(s)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.seq_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; at most {self.seq_len - 1} fit before the answer "
                             f"(task.seq_len {self.seq_len})")
        x = torch.full((self.seq_len,), self.mask_id, dtype=torch.long)
        x[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        return x

    def token_str(self, token: int) -> str:
        return "[MASK]" if token == self.mask_id else self.decode_text([token])

    @property
    def hf_tokenizer(self):
        """The Hugging Face tokenizer of ``tokenizer: {name: hf, path: DIR}`` (``anyorder export``), else None."""
        return getattr(self.tokenizer, "hf", None)

    def describe(self):
        out = super().describe()
        out.update({"tokenizer": self.tokenizer.describe(), "mode": self.mode,
                    "sources": [c.fingerprint() for c in self.corpora],
                    "zero_shot": [c.fingerprint() for c in self.held_out],
                    "tokens": {s: int(len(f)) for s, (f, _) in self.encoded.items()},
                    "documents": {s: int(len(o) - 1) for s, (_, o) in self.encoded.items()}})
        return out

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True, default=str).encode()).hexdigest()[:16]
