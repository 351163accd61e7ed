"""Hugging Face and lm-evaluation-harness adapters, offline: tiny random HF models built from
configs, a word-level tokenizer built in memory, fake models with known logits, and local task files."""
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

from anyorder.adapters.hf import HFMaskedDiffusionLM, generate, load_hf_model, masked_batch, prompt_ids  # noqa: E402
from anyorder.adapters.lm_eval import DecodeCore, GenRequest, task_stats  # noqa: E402
from anyorder.decoding import build_decoder  # noqa: E402
from anyorder.decoding.trace import afp, kendall_tau_b  # noqa: E402
from anyorder.orders import build_order  # noqa: E402
from conftest import assert_batched_equals_row_by_row  # noqa: E402

DATA = Path(__file__).parent / "data"
WORDS = ["[PAD]", "[UNK]", "[EOS]", "[MASK]", "Q", "+", "="] + [str(d) for d in range(10)]
MASK, EOS = WORDS.index("[MASK]"), WORDS.index("[EOS]")
V = len(WORDS)  # 17


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on 2 shared, busy cores OpenMP's
    spinning made a 32-wide BERT forward take ~0.3 s instead of ~1 ms (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_tokenizer():
    """A word-level fast tokenizer over WORDS, built in memory (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece()  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]",
                                                eos_token="[EOS]", mask_token="[MASK]")


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    return transformers.BertForMaskedLM(cfg).eval()


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


class FakeHF(nn.Module):
    """An HF-shaped model (``.logits``) whose logits are a fixed function of position or constant."""

    def __init__(self, table):
        super().__init__()
        self.table = table            # [L, V] per position, or [V] for every position
        self.calls = []

    def forward(self, input_ids, **kw):
        self.calls.append(kw)
        B, L = input_ids.shape
        t = self.table if self.table.dim() == 2 else self.table.expand(L, -1)
        return SimpleNamespace(logits=t[:L].unsqueeze(0).expand(B, L, -1).clone())


def constant_model(favourite="7", runner_up="[EOS]"):
    """Input-independent: '7' most probable everywhere, then EOS; the mask column highest of all raw."""
    t = torch.zeros(V)
    t[WORDS.index(favourite)], t[WORDS.index(runner_up)], t[MASK] = 5.0, 2.0, 50.0
    return HFMaskedDiffusionLM(FakeHF(t), MASK, vocab_size=V)


def prompts(B=4, P=5, G=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (B, P), generator=g).tolist()
    return masked_batch(ids, G, MASK)


DECODERS = [{"name": "top_prob"}, {"name": "margin", "k": 2}, {"name": "entropy", "steps": 4, "window": 3},
            {"name": "random", "temperature": 1.0, "top_p": 0.9}, {"name": "left_to_right"}]


# -- Hugging Face adapter ---------------------------------------------------------------------------
@pytest.mark.parametrize("spec", DECODERS, ids=lambda s: s["name"])
def test_hf_bert_decodes_with_every_kind_of_decoder(spec):
    model = HFMaskedDiffusionLM(tiny_bert(), MASK)
    x, answer = prompts()
    res = build_decoder(dict(spec)).decode(model, build_order("random"), x, answer, row_seeds=[1, 2, 3, 4])
    assert res.tokens.shape == x.shape == (4, 11)
    assert not (res.tokens == MASK).any()                          # nothing left masked, never commits [MASK]
    assert torch.equal(res.tokens[~answer], x[~answer])            # the prompt is untouched
    assert (res.trace.finalize_step[answer] >= 0).all() and (res.trace.finalize_step[~answer] == -1).all()
    expect_afp = {"margin": 2.0, "entropy": 1.5}.get(spec["name"], 1.0)   # k=2; 6 tokens in 4 steps
    assert res.trace.afp().tolist() == [expect_afp] * 4
    assert res.trace.nfe.tolist() == [int(6 / expect_afp)] * 4
    if spec["name"] == "left_to_right":
        assert res.trace.kendall_tau().tolist() == [1.0] * 4


def test_every_registered_decoder_runs_on_hf_models():
    """All decoders here (the decoding lab's included) through both attention modes."""
    from anyorder.decoding import DECODERS

    bert = HFMaskedDiffusionLM(tiny_bert(), MASK)
    llama = HFMaskedDiffusionLM(tiny_llama(), MASK, shift_logits=True, attention="mask4d")
    x, answer = prompts(B=2, G=8)
    for name in DECODERS.names():
        full = build_decoder(name).decode(bert, build_order("random"), x, answer, row_seeds=[3, 4])
        one = build_decoder(name).decode(bert, build_order("random"), x[1:], answer[1:], row_seeds=[4])
        assert torch.equal(one.tokens[0], full.tokens[1]), name
        blk = build_decoder(name).decode(llama, build_order({"name": "block", "block_size": 4}), x, answer)
        for res in (full, blk):
            assert not (res.tokens == MASK).any() and torch.equal(res.tokens[~answer], x[~answer]), name
            assert (res.trace.finalize_step[answer] >= 0).all(), name


def test_distance_diagnostics_run_on_an_hf_model():
    """Seed 004's diagnostics read an HF model through the same forward as the decoders."""
    distance = pytest.importorskip("anyorder.analysis.distance")
    model, order = HFMaskedDiffusionLM(tiny_bert(), MASK), build_order("random")
    x, answer = prompts(B=3, G=8)
    masked = answer & (x == MASK)
    maxp, arg = distance.predict(model, order, x, masked, answer)
    direct = torch.softmax(model(x).double(), -1).max(-1)
    assert torch.allclose(maxp, direct.values) and torch.equal(arg, direct.indices)
    assert not (arg == MASK).any()
    dist = distance.distance_to_visible(masked)
    assert dist[0, 5:].tolist() == list(range(1, 9))                 # prompt ends at position 4
    curve = distance.distance_curve(maxp, dist, masked)
    assert sorted(curve) == list(range(1, 9)) and all(n == 3 for _, n in curve.values())
    for row in distance.parallel_bounds(model, order, x, masked, answer, maxp, arg, max_parallel=3):
        assert row["lower_bonferroni"] <= row["independence"] <= row["upper_min"] <= 1.0
        assert 0.0 < row["chain"] <= 1.0


@pytest.mark.parametrize("which", ["bert", "llama_shifted_mask4d"])
def test_hf_batched_equals_row_by_row(which):
    hf = tiny_bert() if which == "bert" else tiny_llama()
    model = HFMaskedDiffusionLM(hf, MASK, shift_logits=which != "bert",
                                attention="full" if which == "bert" else "mask4d")
    x, answer = prompts(B=3, seed=1)
    seeds = [7, 8, 9]
    for spec in [{"name": "top_prob", "temperature": 1.0, "k": 2}, {"name": "margin", "steps": 4, "window": 3}]:
        dec = build_decoder(spec)
        assert_batched_equals_row_by_row(
            lambda xx, aa, s: dec.decode(model, build_order("random"), xx, aa, row_seeds=s), x, answer, seeds)


def test_shifted_logits_are_dreams_shift_and_mask_column_is_minus_inf():
    L = 5
    table = torch.arange(L * V, dtype=torch.float32).reshape(L, V)   # row i is distinct
    raw = table.clone()
    tokens = torch.zeros(2, L, dtype=torch.long)
    plain = HFMaskedDiffusionLM(FakeHF(table), MASK, vocab_size=V)(tokens)
    shifted = HFMaskedDiffusionLM(FakeHF(table), MASK, shift_logits=True, vocab_size=V)(tokens)
    keep = torch.ones(V, dtype=torch.bool)
    keep[MASK] = False
    assert torch.equal(plain[0][:, keep], raw[:, keep])
    assert torch.equal(shifted[0, 0][keep], raw[0][keep])            # position 0 keeps its own row
    for i in range(1, L):
        assert torch.equal(shifted[0, i][keep], raw[i - 1][keep])    # position i reads hidden state i-1
    assert torch.isinf(plain[..., MASK]).all() and torch.isinf(shifted[..., MASK]).all()
    assert torch.equal(table, raw)                                   # the model's tensor is not written into
    assert plain.dtype == torch.float32


def test_mask_column_cannot_be_predicted_even_when_the_model_prefers_it():
    model = constant_model()                                         # raw logit of [MASK] is 50, the largest
    x, answer = prompts(B=2)
    for spec in ["top_prob", {"name": "random", "temperature": 2.0}]:
        res = build_decoder(spec).decode(model, build_order("random"), x, answer)
        assert not (res.tokens == MASK).any()
    limited = HFMaskedDiffusionLM(FakeHF(torch.arange(V, dtype=torch.float32)), MASK, vocab_size=V, vocab_limit=10)
    out = limited(torch.zeros(1, 3, dtype=torch.long))
    assert torch.isinf(out[..., 10:]).all() and torch.isfinite(out[..., :10][..., torch.arange(10) != MASK]).all()
    assert int(out.argmax(-1)[0, 0]) == 9                           # the padded ids 10.. are out of reach


def test_full_attention_refuses_a_restrictive_order_and_mask4d_honours_it():
    x, answer = prompts(B=2)
    full = HFMaskedDiffusionLM(tiny_bert(), MASK)
    for order in ["ar", "block", "prefix_block"]:
        with pytest.raises(ValueError, match="attention='full'"):
            build_decoder("top_prob").decode(full, build_order(order), x, answer)
    assert full(x, attn_mask=torch.ones(2, 11, 11, dtype=torch.bool)).shape == (2, 11, V)   # all-True is fine
    with pytest.raises(ValueError, match="Valid choices: full, mask4d"):
        HFMaskedDiffusionLM(tiny_bert(), MASK, attention="causal")

    # mask4d on a causal-by-default Llama: no mask -> bidirectional; the AR order's mask -> causal.
    m4 = HFMaskedDiffusionLM(tiny_llama(), MASK, attention="mask4d")
    y = x.clone()
    y[:, -1] = 5
    ar = build_order("ar")
    masked = answer & (x == MASK)
    causal = ar.decode_attention(masked, ar.layout(answer))
    past = lambda t: t[:, :-1, torch.arange(V) != MASK]                # noqa: E731  (finite columns)
    with torch.no_grad():
        assert (past(m4(x)) - past(m4(y))).abs().max() > 1e-4          # the future changes the past
        assert torch.allclose(past(m4(x, attn_mask=causal)), past(m4(y, attn_mask=causal)), atol=1e-6)
    res = build_decoder({"name": "top_prob", "k": 2}).decode(m4, build_order({"name": "block", "block_size": 3}),
                                                              x, answer)
    steps = res.trace.finalize_step[:, 5:]
    assert not (res.tokens == MASK).any()
    assert (steps[:, :3].max(-1).values < steps[:, 3:].min(-1).values).all()   # block by block
    assert res.trace.afp().tolist() == [1.5, 1.5]                              # 2 + 1 per block of 3


def test_adapter_refuses_what_an_hf_model_cannot_take():
    model = HFMaskedDiffusionLM(tiny_bert(), MASK)
    x = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="extra embeddings"):
        model(x, extra={"row": x})
    with pytest.raises(ValueError, match="positions"):
        model(x, positions=torch.arange(1, 5))
    assert model(x, positions=torch.arange(4)).shape == (1, 4, V)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        HFMaskedDiffusionLM(tiny_bert(), V)
    with pytest.raises(ValueError, match="same token length"):
        masked_batch([[1, 2], [1, 2, 3]], 4, MASK)


def test_load_hf_model_from_a_local_directory(tmp_path):
    bert, tok = tiny_bert(seed=3), tiny_tokenizer()
    bert.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tok2 = load_hf_model(str(tmp_path), auto_class="AutoModelForMaskedLM", torch_dtype="fp32")
    assert model.cfg.mask_id == MASK and model.cfg.vocab_size == V     # mask id read from the tokenizer
    x, _ = prompts(B=2)
    ref = HFMaskedDiffusionLM(bert, MASK)(x)
    assert torch.allclose(model(x), ref, atol=1e-5)
    texts, res = generate(model, tok2, ["Q 1 + 2 =", "Q 3 + 4 ="], gen_length=4, decoder={"name": "top_prob", "k": 2})
    assert res.tokens.shape == (2, 9) and not (res.tokens == MASK).any()
    assert texts == [tok2.decode(res.tokens[b, 5:].tolist(), skip_special_tokens=True) for b in range(2)]
    assert res.trace.afp().tolist() == [2.0, 2.0]
    assert prompt_ids(tok2, "Q 1 + 2 =") == [4, 8, 5, 9, 6]
    half, _ = load_hf_model(str(tmp_path), auto_class="AutoModelForMaskedLM", torch_dtype="bf16", load_tokenizer=False,
                            mask_token_id=MASK)
    assert half.dtype == torch.bfloat16 and half(x).dtype == torch.float32
    with pytest.raises(ValueError, match="Valid choices: AutoModel, AutoModelForMaskedLM"):
        load_hf_model(str(tmp_path), auto_class="AutoModelForMagic")
    with pytest.raises(ValueError, match="no mask token id"):
        load_hf_model(str(tmp_path), auto_class="AutoModelForMaskedLM", load_tokenizer=False)


# -- lm-eval core (no lm_eval needed) ----------------------------------------------------------------
def _requests():
    ctx = ["Q 1 + 2 =", "Q 3 =", "Q 4 + 4 =", "Q 5 + 1 + 1 =", "Q 6 ="]
    return [GenRequest(c, {"until": ["\n\n"], "max_gen_toks": 5}, task="t" + str(i % 2), doc_id=i)
            for i, c in enumerate(ctx)]


def test_core_generate_is_direct_decoding_and_independent_of_batching():
    tok = tiny_tokenizer()
    model = HFMaskedDiffusionLM(tiny_bert(), MASK)
    spec = {"name": "top_prob", "temperature": 1.0, "k": 2}
    one = DecodeCore(model, tok, decoder=spec, batch_size=1, seed=10)
    many = DecodeCore(model, tok, decoder=spec, batch_size=3, seed=10)
    reqs = _requests()
    texts = one.generate(reqs)
    assert many.generate(reqs) == texts and many.records == one.records
    # request i == a direct decode of its prompt with seed 10 + i
    for i, r in enumerate(reqs):
        x, answer = masked_batch([prompt_ids(tok, r.context)], 5, MASK)
        res = build_decoder(spec).decode(model, build_order("random"), x, answer, row_seeds=[10 + i])
        gen = res.tokens[0][answer[0]].tolist()
        cut = gen.index(EOS) if EOS in gen else 5
        assert texts[i] == tok.decode(gen[:cut], skip_special_tokens=True)
        assert one.records[i]["afp"] == float(res.trace.afp()[0]) and one.records[i]["nfe"] == 3
    stats = task_stats(one.records)
    assert stats["t0"]["n"] == 3 and stats["t1"]["n"] == 2
    assert stats["t0"]["afp"] == pytest.approx(sum(one.records[i]["afp"] for i in (0, 2, 4)) / 3)


def test_core_until_and_stats_scope():
    tok = tiny_tokenizer()
    model = constant_model(favourite="7", runner_up="[EOS]")
    # left to right, one per step: '7' everywhere -> "7 7 7 7"; an until string cuts the text
    core = DecodeCore(model, tok, decoder="top_prob")
    assert core.generate([GenRequest("Q 1 =", {"max_gen_toks": 4, "until": ["7 7 7"]})]) == [""]
    assert core.generate([GenRequest("Q 1 =", {"max_gen_toks": 4})]) == ["7 7 7 7"]
    rec = core.records[-1]
    assert rec["afp"] == 1.0 and rec["kendall_tau"] == 1.0 and rec["answer_tokens"] == 4
    # EOS everywhere: the answer is empty and, scoped to the tokens before EOS, nothing is scored
    eos = DecodeCore(constant_model(favourite="[EOS]", runner_up="7"), tok, decoder={"name": "top_prob", "k": 2},
                     stats_scope="before_eos")
    assert eos.generate([GenRequest("Q 1 =", {"max_gen_toks": 4})]) == [""]
    assert eos.records[-1]["answer_tokens"] == 0 and math.isnan(eos.records[-1]["kendall_tau"])
    # k=2 over 4 tokens: steps 0,0,1,1 -> AFP 2, tau_b = 4 / sqrt(6 * 4)
    two = DecodeCore(model, tok, decoder={"name": "top_prob", "k": 2}, gen_length=4)
    two.generate([GenRequest("Q 1 =", {"max_gen_toks": 99})])
    assert two.records[-1]["afp"] == 2.0 and two.records[-1]["kendall_tau"] == pytest.approx(4 / math.sqrt(24))
    with pytest.raises(ValueError, match="Valid choices: all, before_eos"):
        DecodeCore(model, tok, stats_scope="some")
    with pytest.raises(ValueError, match="unknown decoder"):
        DecodeCore(model, tok, decoder="topprob")


def test_core_loglikelihood_is_the_elbo_and_exact_for_a_context_free_model():
    tok = tiny_tokenizer()
    model = constant_model()
    logp = torch.log_softmax(model(torch.zeros(1, 1, dtype=torch.long))[0, 0].double(), -1)
    core = DecodeCore(model, tok, mc_samples=16, batch_size=5)
    (same, g1), (mixed, g2), (one, g3) = core.loglikelihood([("Q 1 =", " 7 7 7"), ("Q 1 =", " 7 3 7 2"), ("Q", " 3")])
    # context-free predictions: every masked token contributes log p(token) * n / k, so a
    # continuation of identical tokens gives n log p exactly, for every sample
    assert same == pytest.approx(3 * float(logp[WORDS.index("7")]), abs=1e-9)
    assert one == pytest.approx(float(logp[WORDS.index("3")]), abs=1e-9)
    exact = float(2 * logp[WORDS.index("7")] + logp[WORDS.index("3")] + logp[WORDS.index("2")])
    assert mixed == pytest.approx(exact, rel=0.25)                  # an unbiased Monte-Carlo estimate
    assert (g1, g2, g3) == (True, False, False)
    with pytest.raises(NotImplementedError, match="random-masking ELBO"):
        DecodeCore(model, tok, order="ar").loglikelihood([("Q", " 3")])


# -- lm-evaluation-harness, end to end on local task files --------------------------------------------
def _task_dir(tmp_path):
    out = tmp_path / "tasks"
    out.mkdir()
    for f in (DATA / "lm_eval_tasks").glob("*.yaml"):
        (out / f.name).write_text(f.read_text().replace("__DATA_DIR__", str(DATA.resolve())))
    return str(out)


def test_lm_eval_accuracy_next_to_afp_and_tau_per_task(tmp_path):
    pytest.importorskip("lm_eval")
    from anyorder.adapters.lm_eval import AnyOrderLM, evaluate, summary_rows

    lm = AnyOrderLM(model=constant_model(), tokenizer=tiny_tokenizer(), decoder="top_prob", **{"decoder.k": 2})
    out = evaluate(lm, ["anyorder_tiny_gen_a", "anyorder_tiny_gen_b", "anyorder_tiny_mc"],
                   include_path=_task_dir(tmp_path), include_defaults=False, log_samples=False, bootstrap_iters=0)
    res, stats = out["results"], out["anyorder"]["per_task"]
    # the model writes '7' everywhere: 2 of 4 targets are "7 7 7 7", 1 of 3 is "7 7 7"; it prefers
    # the choice "7" whose gold it is in 3 of 4 multiple-choice docs
    assert res["anyorder_tiny_gen_a"]["exact_match,none"] == 0.5
    assert res["anyorder_tiny_gen_b"]["exact_match,none"] == pytest.approx(1 / 3)
    assert res["anyorder_tiny_mc"]["acc,none"] == 0.75
    # two tokens per step: 4 tokens -> AFP 2, 3 tokens -> AFP 1.5; ties go left to right
    assert stats["anyorder_tiny_gen_a"] == {"afp": 2.0, "kendall_tau": pytest.approx(4 / math.sqrt(24)), "nfe": 2.0,
                                            "n": 4, "n_tau": 4}
    assert stats["anyorder_tiny_gen_b"]["afp"] == 1.5 and stats["anyorder_tiny_gen_b"]["nfe"] == 2.0
    assert stats["anyorder_tiny_gen_b"]["kendall_tau"] == pytest.approx(2 / math.sqrt(6))
    assert "anyorder_tiny_mc" not in stats                          # loglikelihood requests decode nothing
    rows = {(r["task"], r["metric"]): r for r in summary_rows(out)}
    assert rows[("anyorder_tiny_gen_a", "exact_match,none")]["afp"] == 2.0


def test_lm_eval_registry_and_command_line(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model

    from anyorder.adapters.lm_eval import main

    model_dir = tmp_path / "model"
    tiny_bert(seed=5).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    args = f"pretrained={model_dir},auto_class=AutoModelForMaskedLM,dtype=fp32,decoder=margin,decoder.k=2,batch_size=2"
    lm = get_model("anyorder").create_from_arg_string(args, {"batch_size": None, "device": None})
    assert lm.core.decoder.k == 2 and lm.core.decoder.score == "margin" and lm.core.batch_size == 2
    with pytest.raises(ValueError, match=r"unknown anyorder model_args \['decodr'\]"):
        get_model("anyorder").create_from_arg_string(args + ",decodr=margin")
    out_json = tmp_path / "out.json"
    assert main(["--model_args", args, "--tasks", "anyorder_tiny_gen_a", "--include_path", _task_dir(tmp_path),
                 "--only_include_path", "--output", str(out_json)]) == 0
    table = capsys.readouterr().out
    assert re.search(r"\| anyorder_tiny_gen_a \| exact_match,none \| 0\.0000 \| 2\.0000 \| ", table)
    saved = json.loads(out_json.read_text())
    assert len(saved["anyorder"]["requests"]) == 4 and saved["anyorder"]["per_task"]["anyorder_tiny_gen_a"]["nfe"] == 2
