"""Encode a corpus's splits once and cache the ids on disk.

``<cache>/encoded/<tokenizer key>/<corpus fingerprint>-v<val>-t<test>.npz`` holds, for every
split, ``flat_<split>`` (int32 ids, documents back to back, no separators) and
``offsets_<split>`` (document boundaries). A cache hit does not read the corpus at all.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from .corpus import SPLITS, Corpus, split_documents
from .tokenizers import TextTokenizer

Encoded = Dict[str, Tuple[np.ndarray, np.ndarray]]


def _encode_docs(tokenizer: TextTokenizer, texts, batch: int = 1024) -> Tuple[np.ndarray, np.ndarray]:
    ids = []
    for i in range(0, len(texts), batch):
        ids += tokenizer.encode_batch(texts[i:i + batch])
    lens = np.array([len(x) for x in ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    flat = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(lens.sum()))
    return flat, offsets


def encode_corpus(corpus: Corpus, tokenizer: TextTokenizer, val_frac: float = 0.05, test_frac: float = 0.05,
                  cache_dir: Optional[Path] = None, docs: Optional[dict] = None) -> Encoded:
    """{split: (flat int32 ids, offsets)}; ``docs`` (from :func:`split_documents`) saves a re-read."""
    path = None
    if cache_dir is not None:
        tag = hashlib.sha256(f"{corpus.fingerprint()}|{val_frac}|{test_frac}".encode()).hexdigest()[:16]
        path = Path(cache_dir) / "encoded" / tokenizer.key() / f"{tag}.npz"
        if path.exists():
            with np.load(path) as z:
                return {s: (z[f"flat_{s}"], z[f"offsets_{s}"]) for s in SPLITS}
    docs = docs if docs is not None else split_documents(corpus, val_frac, test_frac)
    out = {s: _encode_docs(tokenizer, [d.text for d in docs[s]]) for s in SPLITS}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, **{f"{k}_{s}": v for s in SPLITS for k, v in zip(("flat", "offsets"), out[s])})
        tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    return out


def concat(parts) -> Tuple[np.ndarray, np.ndarray]:
    """Join several (flat, offsets) pairs into one."""
    flats, offs, base = [], [np.zeros(1, dtype=np.int64)], 0
    for flat, off in parts:
        flats.append(flat)
        offs.append(off[1:] + base)
        base += len(flat)
    return (np.concatenate(flats) if flats else np.zeros(0, dtype=np.int32)), np.concatenate(offs)
