"""Traces that record every event (decoding/events.py), saved decodes (evaluation/saved.py), the
viewer's page data and the serve page's option checks -- everything of the viewer that needs no
browser (tests/test_viewer_browser.py drives the pages)."""
import json
import re

import pytest
import torch

from anyorder import cli
from anyorder.decoding import build_decoder
from anyorder.decoding.events import COMMIT, EDIT, REMASK
from anyorder.decoding.trace import afp, kendall_tau_b
from anyorder.evaluation.saved import load_decode, save_decode
from anyorder.orders import build_order
from anyorder.viewer.page import embed_json, render_page
from anyorder.viewer.server import Session, parse_request, sample_argv

from conftest import make_batch
from test_decoders_lab import _remask_model, masked_row, planted_wrong_token

DECODERS = ["margin", "top_prob", {"name": "random", "k": 2}, {"name": "threshold", "tau": 0.3},
            {"name": "ancestral", "steps": 8}, {"name": "beam", "k": 2}, {"name": "random_init"},
            {"name": "left_to_right", "window": 4}, {"name": "remask", "k": 3, "n_remask": 2},
            {"name": "edit", "k": 4, "edit_tau": 0.9}, {"name": "top_prob", "k": 2, "temperature": 1.0}]


def _decode(model, spec, order="random", B=3, L=40, **attrs):
    x0, answer = make_batch(B=B, L=L, prompt=3)
    x = torch.where(answer, torch.full_like(x0, 8), x0)
    dec = build_decoder(spec)
    for k, v in attrs.items():
        setattr(dec, k, v)
    return dec.decode(model, build_order(order), x, answer, row_seeds=[5, 6, 7][:B])


@pytest.mark.parametrize("spec", DECODERS, ids=str)
def test_events_rebuild_the_trace_exactly(tiny_model, spec):
    # 37 answer tokens one or two per step: more steps than one flush of the log (16 records)
    r = _decode(tiny_model, spec)
    tr, ev = r.trace, r.trace.events
    fin, conf = ev.finalize(tr.finalize_step.shape)
    assert torch.equal(fin, tr.finalize_step) and torch.equal(conf, tr.confidence)
    assert torch.equal(afp(fin, tr.answer), tr.afp())
    assert torch.equal(kendall_tau_b(fin, tr.answer).nan_to_num(9.0), tr.kendall_tau().nan_to_num(9.0))
    for b in range(3):
        assert ev.committed_count(b, int(fin[b].max())) == int(tr.answer[b].sum())
        assert ev.committed_count(b, -1) == 0
    # the tokens of the last commits are the decoded tokens
    last_tok = torch.full_like(r.tokens, -1)
    keep = ev.kind != REMASK
    for o in torch.argsort(ev.order[keep]).tolist():
        last_tok[ev.row[keep][o], ev.pos[keep][o]] = ev.token[keep][o]
    assert torch.equal(last_tok[tr.answer], r.tokens[tr.answer])
    if not (isinstance(spec, dict) and spec["name"] in ("remask", "edit")):  # never re-mask
        assert (ev.kind == COMMIT).all() and len(ev.row) == int(tr.answer.sum())


@pytest.mark.parametrize("spec", [{"name": "remask", "k": 3}, {"name": "edit", "k": 4, "edit_tau": 0.9}, "margin"], ids=str)
def test_recording_changes_nothing(tiny_model, spec):
    plain = _decode(tiny_model, spec)
    seen = []
    rich = _decode(tiny_model, spec, alternatives=4, on_step=lambda st: seen.append(st.events.drain()))
    assert torch.equal(plain.tokens, rich.tokens)
    assert torch.equal(plain.trace.finalize_step, rich.trace.finalize_step)
    assert torch.equal(plain.trace.confidence, rich.trace.confidence)
    # what was streamed step by step is every event, once
    assert sum(len(e.row) for e in seen) == len(rich.trace.events.row) == len(plain.trace.events.row)
    assert plain.trace.events.alt_token.shape[1] == 0 and rich.trace.events.alt_token.shape[1] == 4
    off = _decode(tiny_model, spec, record_events=False)                 # the opt-out
    assert off.trace.events is None and torch.equal(off.tokens, plain.tokens)
    assert torch.equal(off.trace.finalize_step, plain.trace.finalize_step)


def test_alternatives_are_the_top_tokens(tiny_model):
    ev = _decode(tiny_model, {"name": "top_prob", "k": 2}, alternatives=3).trace.events
    assert torch.equal(ev.alt_token[:, 0], ev.token)                    # greedy: the proposal is the top-1
    assert torch.equal(ev.alt_prob[:, 0], ev.conf.float())
    assert (ev.alt_prob[:, :-1] >= ev.alt_prob[:, 1:]).all()


def test_remask_events_step_by_step():
    # the hand-built case of test_decoders_lab: step 0 commits 0 (0.6) and 1, step 1 commits 2, 3
    # and re-masks 0, step 2 writes 0 again with another token (an edit)
    x, answer = masked_row(5)
    r = build_decoder({"name": "remask", "k": 2, "n_remask": 1, "remask_until": 1.0}).decode(
        _remask_model(), build_order("random"), x, answer)
    ev = r.trace.events
    got = list(zip(ev.step.tolist(), ev.pos.tolist(), ev.kind.tolist(), ev.token.tolist()))
    assert got == [(0, 0, COMMIT, 1), (0, 1, COMMIT, 5), (1, 2, COMMIT, 6), (1, 3, COMMIT, 7),
                   (1, 0, REMASK, -1), (2, 0, EDIT, 2), (2, 4, COMMIT, 8)]
    assert [ev.committed_count(0, s) for s in range(3)] == [2, 3, 5]


def test_edit_records_the_correction_of_a_planted_token():
    truth, model, x, answer = planted_wrong_token()
    ev = build_decoder({"name": "edit", "k": 4}).decode(model, build_order("random"), x, answer).trace.events
    assert ev.pos[ev.kind == REMASK].tolist() == [6]
    assert ev.pos[ev.kind == EDIT].tolist() == [6] and ev.token[ev.kind == EDIT].tolist() == [int(truth[6])]
    assert ev.step[ev.kind == REMASK].tolist() == ev.step[ev.kind == EDIT].tolist() == [2]  # after the 2-step draft


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from anyorder.config import load_config
    from anyorder.experiment import train
    over = ["task.n_train=64", "task.n_eval=16", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
            "train.steps=2", "train.warmup_steps=1", "train.batch_size=8", "train.progress=false", "train.precision=fp32",
            "eval.n=4", f"out_dir={tmp_path_factory.mktemp('runs')}", "name=t"]
    return str(train(load_config("configs/sudoku4.yaml", over)))


def test_view_saves_decodes_and_writes_one_page(tiny_run, tmp_path):
    out = tmp_path / "v.html"
    assert cli.main(["view", tiny_run, "--decoder", "remask", "--k", "3", "--n", "5", "--out", str(out)]) == 0
    saved = load_decode(f"{tiny_run}/decodes/remask_k_3.safetensors")
    assert saved["decoder"] == {"name": "remask", "k": 3} and saved["run"]["grid_shape"] == [4, 4]
    assert saved["vocab"][1] == "1" and saved["vocab"][6] == "_" and saved["trace"].events.alt_token.shape[1] == 3
    page = out.read_text()
    data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S).group(1))
    (panel,) = data["panels"]
    assert panel["label"] == "MDLM (random) / remask(k=3)" and len(panel["rows"]) == 5
    ev = saved["trace"].events
    assert [len(r["ev"]) // 5 for r in panel["rows"]] == [int((ev.row == b).sum()) for b in range(5)]
    assert [r["nfe"] for r in panel["rows"]] == saved["nfe"].tolist()
    # self-contained: nothing is fetched (no URL, no src/href attribute)
    assert not re.search(r"https?://|\bsrc=|\bhref=|@import|url\(", page)


def test_saved_decode_round_trip_and_errors(tiny_run, tmp_path):
    from anyorder.experiment import load_run, run_decoder
    exp = load_run(tiny_run)
    x0, answer = exp.task.eval_set(3)
    metrics, res = run_decoder(exp.model, exp, "margin", x0, answer, return_results=True, alternatives=2)
    p = save_decode(tmp_path / "d.safetensors", exp, "margin", x0, answer, res, metrics)
    back = load_decode(p)
    for k in ("finalize_step", "confidence", "nfe"):
        assert torch.equal(back["trace"].__dict__[k if k != "finalize_step" else k], getattr(res.trace, k))
    assert torch.equal(back["tokens"], res.tokens) and back["metrics"] == json.loads(json.dumps(metrics))
    for f in ("row", "step", "pos", "kind", "token", "conf", "alt_token", "alt_prob"):
        assert torch.equal(getattr(back["trace"].events, f), getattr(res.trace.events, f))
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="is not a saved decode"):
        load_decode(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="no saved decode"):
        load_decode(tmp_path / "missing.safetensors")


def test_page_data_cannot_break_out_of_its_script():
    text = embed_json({"vocab": {"1": "</script><script>alert(1)</script>"}, "x": float("nan")})
    assert "<" not in text and json.loads(text) == {"vocab": {"1": "</script><script>alert(1)</script>"}, "x": None}
    page = render_page({"mode": "static", "title": "<b>t</b>", "panels": [], "vocab": {}, "examples": 0})
    assert "<title>&lt;b&gt;t&lt;/b&gt;</title>" in page and page.count("</script>") == 2


def _cli_error(capsys, argv):
    assert cli.main(argv) == 2
    return capsys.readouterr().err.strip().removeprefix("anyorder: error: ")


@pytest.mark.parametrize("fields, cli_args", [
    ({"decoder": ["margin"], "k": ["-3"]}, ["--decoder", "margin", "--k", "-3"]),
    ({"decoder": ["margin"], "k": ["two"]}, ["--decoder", "margin", "--k", "two"]),
    ({"decoder": ["margni"]}, ["--decoder", "margni"]),
    ({"decoder": ["edit"], "opt": ["tau=0.5\nk=2"]}, ["--decoder", "edit", "--opt", "tau=0.5", "--opt", "k=2"]),
    ({"decoder": ["threshold"], "opt": ["tau=7"]}, ["--decoder", "threshold", "--opt", "tau=7"]),
    ({"decoder": ["margin"], "temperature": ["-1"]}, ["--decoder", "margin", "--temperature", "-1"]),
])
def test_serve_checks_options_exactly_as_the_cli(tiny_run, capsys, fields, cli_args):
    want = _cli_error(capsys, ["sample", tiny_run, *cli_args])
    with pytest.raises(ValueError) as exc:
        parse_request(fields, tiny_run)
    assert " ".join(str(exc.value).split()) == want


def test_serve_fields_cannot_reach_other_flags(tiny_run):
    with pytest.raises(ValueError, match="unknown field.*plugin"):
        sample_argv({"decoder": ["margin"], "plugin": ["evil.py"]}, tiny_run)
    argv = sample_argv({"decoder": ["margin"], "k": ["2 --plugin evil.py"], "opt": ["--trust-plugins"]}, tiny_run)
    assert argv == ["sample", tiny_run, "--decoder=margin", "--k=2 --plugin evil.py", "--opt=--trust-plugins"]
    with pytest.raises(ValueError, match="invalid int value"):
        parse_request({"decoder": ["margin"], "k": ["2 --plugin evil.py"]}, tiny_run)
    assert parse_request({"decoder": ["remask"], "k": ["3"], "cache": ["on"], "opt": ["n_remask=2"]}, tiny_run) == \
        {"name": "remask", "k": 3, "n_remask": 2, "cache": True}


def test_serve_inputs(tiny_run):
    s = Session(tiny_run)
    with pytest.raises(ValueError, match="puzzle '1234': "):
        s.rows({"puzzle": ["1234"]})
    with pytest.raises(ValueError, match="example 99 is out of range: the held-out set has 16 rows"):
        s.rows({"example": ["99"]})
    with pytest.raises(ValueError, match="give a puzzle or an example index"):
        s.rows({})
    x0, answer, first, warning = s.rows({"example": ["2"]})
    assert first == 2 and torch.equal(x0[0], s.exp.task.eval_set(3)[0][2]) and warning is None


@pytest.mark.slow
def test_event_recording_overhead(capsys):
    """What recording the events costs a decode (README): interleaved, best of 5."""
    import time
    from anyorder.model import ModelConfig, Transformer
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=9, mask_id=8, d_model=32, n_layers=2, n_heads=2, max_len=128)).eval()
    x0, answer = make_batch(B=32, L=128, prompt=8)
    x = torch.where(answer, torch.full_like(x0, 8), x0)
    best = {True: float("inf"), False: float("inf")}
    for _ in range(5):
        for record in (True, False):
            dec = build_decoder({"name": "top_prob", "k": 2})
            dec.record_events = record
            t = time.perf_counter()
            dec.decode(model, build_order("random"), x, answer)
            best[record] = min(best[record], time.perf_counter() - t)
    ratio = best[True] / best[False]
    with capsys.disabled():
        print(json.dumps({"event_recording_overhead": round(ratio, 3), "with_s": round(best[True], 3),
                          "without_s": round(best[False], 3)}))
    assert ratio < 1.25


def test_text_prompts_parse_for_sample_and_serve(tmp_path):
    from anyorder.tasks import build_task
    from test_text import write_corpus
    task = build_task({"name": "text", "sources": [write_corpus(tmp_path, "a", 40, 0)], "zero_shot": [],
                       "tokenizer": "byte", "seq_len": 16, "cache_dir": str(tmp_path / "c")})
    x = task.parse("Hi there")
    assert x[:8].tolist() == list(b"Hi there") and (x[8:] == task.mask_id).all()
    assert task.token_str(ord("H")) == "H" and task.token_str(task.mask_id) == "[MASK]"
    with pytest.raises(ValueError, match="the prompt has 20 tokens; at most 15 fit before the answer"):
        task.parse("x" * 20)
    with pytest.raises(ValueError, match="the prompt is empty"):
        task.parse("")


def test_events_of_batches_join_as_one_decode(tiny_run):
    from anyorder.experiment import load_run, run_decoder
    exp = load_run(tiny_run)
    x0, answer = exp.task.eval_set(5)
    spec = {"name": "remask", "k": 3, "temperature": 1.0}
    _, one = run_decoder(exp.model, exp, spec, x0, answer, return_results=True)
    _, parts = run_decoder(exp.model, exp, spec, x0, answer, batch_size=2, return_results=True)
    a, b = one.trace.events, parts.trace.events
    for f in ("row", "step", "pos", "kind", "token"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    # the output head runs on the commit candidates only, and a matmul over another number of rows
    # may round differently in the last bits: confidences agree to float32 precision, not bit for bit
    torch.testing.assert_close(a.conf, b.conf, rtol=1e-6, atol=0)
    assert torch.equal(b.finalize(x0.shape)[0], parts.trace.finalize_step)


def test_view_puts_orders_side_by_side_on_the_same_prompts(tiny_run, tmp_path):
    from anyorder.config import load_config
    from anyorder.experiment import train
    over = ["task.n_train=64", "task.n_eval=16", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
            "train.steps=2", "train.warmup_steps=1", "train.batch_size=8", "train.progress=false", "train.precision=fp32",
            "eval.n=4", f"out_dir={tmp_path}", "name=ar", "order.name=ar"]
    ar_run = str(train(load_config("configs/sudoku4.yaml", over)))
    out = tmp_path / "v.html"
    assert cli.main(["view", tiny_run, ar_run, "--decoder", "top_prob", "--n", "3", "--out", str(out)]) == 0
    data = json.loads(re.search(r'type="application/json">(.*?)</script>', out.read_text(), re.S).group(1))
    random_panel, ar_panel = data["panels"]
    assert (random_panel["order"], ar_panel["order"]) == ("MDLM (random)", "AR")
    assert [r["x"] for r in random_panel["rows"]] == [r["x"] for r in ar_panel["rows"]]
    assert all(r["tau"] == 1.0 for r in ar_panel["rows"])                 # AR finalises left to right
