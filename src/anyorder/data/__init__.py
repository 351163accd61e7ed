"""Text data: corpora with deterministic splits, tokenizers with a [MASK] id, packing.

    from anyorder.data import build_corpus, split_documents, build_tokenizer, encode_corpus, pack
"""
import os
from pathlib import Path

from .corpus import CORPORA, Corpus, Document, build_corpus, hash_split, split_documents
from .packing import pack, pad_rows, with_separators
from .tokenizers import TOKENIZERS, TextTokenizer, build_tokenizer
from .encode import encode_corpus


def default_cache_dir() -> Path:
    """``$ANYORDER_CACHE_DIR`` or ``~/.cache/anyorder``: trained tokenizers and encoded corpora."""
    return Path(os.environ.get("ANYORDER_CACHE_DIR") or Path.home() / ".cache" / "anyorder")


__all__ = ["CORPORA", "Corpus", "Document", "build_corpus", "hash_split", "split_documents", "pack", "pad_rows",
           "with_separators", "TOKENIZERS", "TextTokenizer", "build_tokenizer", "encode_corpus", "default_cache_dir"]
