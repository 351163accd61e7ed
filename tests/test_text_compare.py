"""Text comparison (studies/text_compare.py, studies/lomdm_velocity.py) on tiny random-init runs."""
import json
import math

import numpy as np
import pytest
import torch

from anyorder.studies.lomdm_velocity import classify_text, reveal_rank, token_kinds, velocity_summary
from anyorder.studies.text_compare import generate, judge_nll, sampler_spec, sampling_decoder, unigram_entropy
from anyorder.studies.text_compare_report import COLUMNS, table_rows
from anyorder.data import build_tokenizer
from anyorder.orders import build_order

SEQ_LEN = 16


def _corpus(path, name, n_docs, seed):
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", ",", "and", "dog", "ran", "42", "."]
    with open(path, "w") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": " ".join(rng.choice(words, rng.integers(3, 30)))}) + "\n")
    return {"name": "files", "paths": [str(path)], "source": name}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Random-init run directories (config.yaml, model.safetensors, metrics.jsonl) of four orders
    on a local corpus with byte tokens; ``ar`` doubles as the judge."""
    from anyorder.config import DEFAULTS, dump, merge, normalise
    from anyorder.experiment import build
    from anyorder.train import save_weights

    root = tmp_path_factory.mktemp("text_compare")
    train_src = _corpus(root / "a.jsonl", "a", 120, 0)
    held_out = _corpus(root / "b.jsonl", "b", 40, 1)
    out = {}
    for i, (label, order) in enumerate([("ar", {"name": "ar"}), ("mdlm", {"name": "random"}),
                                        ("lomdm", {"name": "learned"}), ("block4", {"name": "block", "block_size": 4})]):
        cfg = normalise(merge(DEFAULTS, {
            "name": label, "task": {"name": "text", "sources": [train_src], "zero_shot": [held_out],
                                    "tokenizer": "byte", "seq_len": SEQ_LEN, "test_frac": 0.2, "val_frac": 0.1,
                                    "zero_shot_split": "all", "cache_dir": str(root / "cache")},
            "order": order, "model": {"d_model": 32, "n_layers": 1, "n_heads": 2}}))
        exp = build(cfg)
        d = root / label
        d.mkdir()
        (d / "config.yaml").write_text(dump(exp.cfg))
        save_weights(exp.model, d / "model.safetensors")
        (d / "metrics.jsonl").write_text(json.dumps({"step": 7, "event": "train", "flops": 1000.0 * (i + 1)}) + "\n")
        out[label] = d
    return out


def test_unigram_entropy_is_zero_for_a_constant_row_and_log_v_for_all_distinct():
    V = 50
    tokens = torch.stack([torch.full((V,), 3), torch.arange(V)])
    h = unigram_entropy(tokens)
    assert h[0].item() == 0.0
    assert h[1].item() == pytest.approx(math.log(V), abs=1e-12)
    # only answer positions count: a row of 4 distinct tokens of which 2 are scored
    half = unigram_entropy(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[True, True, False, False]]))
    assert half.item() == pytest.approx(math.log(2), abs=1e-12)


def test_judge_gen_ppl_of_its_own_samples_is_exp_of_the_nll_along_its_decoding_path(runs):
    from anyorder.experiment import load_run

    judge = load_run(runs["ar"])
    spec = sampler_spec(judge.order, SEQ_LEN)
    assert spec["name"] == "left_to_right" and spec["temperature"] == 1.0 and spec["cache"]
    g = generate(judge, 6, spec, seed=3, batch_size=4)
    # left to right at temperature 1: the confidence recorded at each commit is p(x_i | x_<i)
    nll_direct = -g["confidence"].log().mean().item()
    res = judge_nll(judge, g["tokens"])
    assert res["nll_per_token"] == pytest.approx(nll_direct, abs=1e-5)
    assert res["gen_ppl"] == pytest.approx(math.exp(nll_direct), rel=1e-5)
    assert g["nfe_mean"] == SEQ_LEN and g["steps"] == SEQ_LEN


def test_judge_must_be_ar(runs):
    from anyorder.experiment import load_run

    with pytest.raises(ValueError, match="judge must be an AR run"):
        judge_nll(load_run(runs["mdlm"]), torch.zeros(1, SEQ_LEN, dtype=torch.long))
    from anyorder.cli import main
    assert main(["text-compare", str(runs["ar"]), "--judge", str(runs["mdlm"]), "--out", str(runs["ar"].parent / "x")]) == 2


class _FixedLogits(torch.nn.Module):
    """A 'model' whose logits are the same table whatever the input."""

    def __init__(self, logits, mask_id):
        super().__init__()
        self.logits = logits
        self.cfg = type("C", (), {"mask_id": mask_id, "vocab_size": logits.shape[-1]})()

    def forward(self, x, attn_mask=None, extra=None, **kw):
        return self.logits.expand(x.shape[0], *self.logits.shape).clone()


def test_sampling_only_where_committable_draws_from_the_softmax():
    # 3 positions, 4 real tokens + mask; ancestral under the random order: every position's
    # token must follow softmax(logits) (temperature 1) whatever step commits it
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]] * 3)
    model = _FixedLogits(logits, mask_id=4)
    n = 3000
    dec = sampling_decoder({"name": "ancestral", "steps": 3, "temperature": 1.0})
    res = dec.decode(model, build_order("random"), torch.full((n, 3), 4), torch.ones(n, 3, dtype=torch.bool))
    p = torch.softmax(logits[0, :4].double(), -1)
    freq = torch.bincount(res.tokens.flatten(), minlength=5)[:4].double() / (3 * n)
    se = (p * (1 - p) / (3 * n)).sqrt()
    assert ((freq - p).abs() < 4.5 * se).all(), (freq, p)


def test_natural_decoders_per_order():
    assert sampler_spec(build_order("random"), 128)["name"] == "ancestral"
    blk = sampler_spec(build_order({"name": "block", "block_size": 16}), 128, steps=64)
    assert (blk["name"], blk["window"], blk["steps"]) == ("ancestral", 16, 64)
    blk8 = sampler_spec(build_order({"name": "block", "block_size": 8}), 128, steps=20)
    assert blk8["steps"] == 32  # rounded up to a multiple of the 16 blocks
    sc = sampler_spec(build_order({"name": "scatter", "block_size": 4}), 128)
    assert (sc["name"], sc["steps_per_offset"]) == ("scatter_offsets", 32)
    assert sampler_spec(build_order("learned"), 128)["name"] == "learned_ancestral"
    assert all(sampler_spec(build_order(o), 128)["temperature"] == 1.0 for o in ("ar", "random", "learned"))


def test_table_has_one_row_per_run_with_the_expected_columns(runs, tmp_path):
    from anyorder.cli import main

    out = tmp_path / "cmp"
    labels = ["mdlm", "lomdm", "block4", "ar"]
    rc = main(["text-compare", *[str(runs[k]) for k in labels], "--judge", str(runs["ar"]), "--out", str(out),
               "--samples", "3", "--mc", "2", "--n", "4", "--batch-size", "2"])
    assert rc == 0
    res = json.loads((out / "text_compare.json").read_text())
    assert [r["label"] for r in res["rows"]] == labels
    rows = table_rows(res)
    assert len(rows) == 4 and all(list(r) == list(COLUMNS) for r in rows)
    by = {r["label"]: r for r in res["rows"]}
    assert by["ar"]["test"]["bound"] == "exact NLL" and by["ar"]["judge_is_this_run"]
    assert by["mdlm"]["test"]["bound"].startswith("NELBO") and by["mdlm"]["test"]["samples"] == 2
    assert by["lomdm"]["test"]["velocity_per_token"] >= 0 and by["lomdm"]["zero_shot"] is not None
    assert (by["block4"]["flops"], by["block4"]["steps"]) == (4000.0, 7)
    assert by["mdlm"]["generation"]["steps"] == SEQ_LEN and by["mdlm"]["generation"]["samples"] == 3
    md = (out / "text_compare.md").read_text()
    main_table = md.split("### What")[0]
    assert main_table.count("\n| ") == 1 + 4 + 1  # header, 4 runs, the real-rows reference
    assert "What the learned order learned (lomdm)" in md and (out / "lomdm" / "lomdm_velocity_position.png").exists()


def test_punctuation_classification_of_known_tokens():
    assert [classify_text(t) for t in [",", ".", " ", "\n", "", " the", "Cat", "'s", "1990", " 42", "\ufffd"]] == \
        ["punct/space"] * 5 + ["word"] * 3 + ["digits"] * 2 + ["other"]
    kinds = token_kinds(build_tokenizer("byte"))
    assert len(kinds) == 258
    assert (kinds[ord(",")], kinds[ord("a")], kinds[ord("7")], kinds[0xC3]) == ("punct/space", "word", "digits", "other")
    assert kinds[256] == kinds[257] == "separator"  # EOS and [MASK]


def test_velocity_by_position_has_seq_len_entries_for_a_learned_run(runs):
    from anyorder.experiment import load_run

    exp = load_run(runs["lomdm"])
    steps = torch.tensor([[0, 1, 1, 3] * (SEQ_LEN // 4)] * 2)
    s = velocity_summary(exp, n=8, finalize_steps=steps)
    pos = s["by_position"]
    assert len(pos["k_mean"]) == len(pos["k_std"]) == len(pos["sample_reveal_rank"]) == SEQ_LEN
    lo, hi = exp.order.c1 - exp.order.c2, exp.order.c1 + exp.order.c2
    assert all(lo < k < hi for k in pos["k_mean"])
    assert sum(d["count"] for d in s["by_kind"].values()) == s["tokens"]
    with pytest.raises(ValueError, match="order 'learned'"):
        velocity_summary(load_run(runs["mdlm"]))


def test_reveal_rank_is_scaled_and_shares_ties():
    r = reveal_rank(torch.tensor([[0, 2, 1, 1]]))
    assert r.tolist() == [[0.0, 1.0, 0.5, 0.5]]


def test_lomdm_bound_with_c1_1_c2_0_is_exactly_the_mdlm_bound(tiny_model):
    # (c1, c2) = (1, 0): k = 1 everywhere, so LoMDM's NELBO (main + velocity, velocity 0) is MDLM's;
    # the same generator draws the same t and masks, so the two estimates agree to rounding
    from anyorder.model.lomdm import LoMDM
    from anyorder.objectives.lomdm import lomdm_likelihood
    from anyorder.objectives.nelbo import likelihood

    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 8, (10, 12), generator=g)
    answer = torch.ones_like(x0, dtype=torch.bool)
    lomdm = LoMDM(tiny_model, c1=1.0, c2=0.0).eval()
    ours = lomdm_likelihood(lomdm, x0, answer, samples=3, batch_size=4, seed=5)
    ref = likelihood(tiny_model, build_order("random"), x0, answer, 8, samples=3, batch_size=4, seed=5)
    assert ours["velocity_per_token"] == 0.0
    assert ours["replicates"] == pytest.approx(ref["replicates"], rel=1e-6)
    assert ours["stderr"] == pytest.approx(ref["stderr"], rel=1e-4)
