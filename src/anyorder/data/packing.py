"""Turn encoded documents into fixed-length rows.

An encoded split is ``(flat, offsets)``: document ``d``'s tokens are
``flat[offsets[d]:offsets[d + 1]]`` (no BOS/EOS yet). Two layouts:

- ``pack`` (MDLM's "wrap"): every document becomes ``[BOS] tokens EOS``, all are concatenated
  and chopped into rows of ``seq_len`` (the incomplete tail is dropped). Every position is
  scored, separators included: the model also learns where documents end.
- ``pad_rows`` (sentence mode, LM1B-style): one document per row, ``[BOS] tokens EOS`` then
  ``pad_id``; a document longer than a row continues on the next rows (or, with
  ``truncate``, keeps its first row only). The answer mask is False on the padding, so pad
  positions are never scored; they are visible to every order as prompt tokens, so the
  likelihood in this mode is conditional on the row's length.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch


def with_separators(flat: np.ndarray, offsets: np.ndarray, eos_id: int, bos_id: Optional[int] = None) -> np.ndarray:
    """The concatenation of ``[BOS] doc EOS`` over all documents, vectorised."""
    n_docs = len(offsets) - 1
    lens = np.diff(offsets)
    extra = 1 + (bos_id is not None)
    out = np.empty(int(lens.sum()) + extra * n_docs, dtype=np.int64)
    starts = offsets[:-1] + extra * np.arange(n_docs) + (bos_id is not None)  # where each doc's tokens land
    ends = starts + lens
    idx = np.repeat(starts - offsets[:-1], lens) + np.arange(len(flat))  # new position of every token
    out[idx] = flat
    out[ends] = eos_id
    if bos_id is not None:
        out[starts - 1] = bos_id
    return out


def pack(flat: np.ndarray, offsets: np.ndarray, seq_len: int, eos_id: int, bos_id: Optional[int] = None) -> torch.Tensor:
    """[N, seq_len] rows of the separator-joined stream (tail dropped)."""
    stream = with_separators(flat, offsets, eos_id, bos_id)
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"the split holds {len(stream)} tokens, fewer than one row of seq_len={seq_len}")
    return torch.from_numpy(stream[: n * seq_len].reshape(n, seq_len).copy())


def pad_rows(flat: np.ndarray, offsets: np.ndarray, seq_len: int, eos_id: int, pad_id: int,
             bos_id: Optional[int] = None, truncate: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x0 [N, seq_len], answer [N, seq_len]) with one document per row (continued over rows)."""
    rows, lengths = [], []
    for d in range(len(offsets) - 1):
        doc = flat[offsets[d]:offsets[d + 1]].tolist()
        seq = ([bos_id] if bos_id is not None else []) + doc + [eos_id]
        pieces = [seq[i:i + seq_len] for i in range(0, len(seq), seq_len)]
        for piece in pieces[:1] if truncate else pieces:
            lengths.append(len(piece))
            rows.append(piece + [pad_id] * (seq_len - len(piece)))
    if not rows:
        raise ValueError("no documents to pad")
    x0 = torch.tensor(rows, dtype=torch.long)
    answer = torch.arange(seq_len).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return x0, answer
