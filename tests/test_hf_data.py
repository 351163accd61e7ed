"""The ``chat`` task: prompt/response and chat JSONL rendered with the tokenizer's chat template,
answer = response tokens, padding/packing/truncation, and its errors. Tokenizers are built in
tmp_path from a word list (nothing downloaded)."""
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from anyorder.config import load_config  # noqa: E402
from anyorder.data.chat_format import generation_prompt_ids, save_example_tokenizer, word_level_tokenizer  # noqa: E402
from anyorder.experiment import train  # noqa: E402
from anyorder.orders import build_order  # noqa: E402
from anyorder.tasks import build_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "data" / "examples" / "chat.jsonl"
EXAMPLE_TOKENIZER = ROOT / "data" / "examples" / "chat_tokenizer"
CHAT_CONFIG = str(ROOT / "configs" / "hf" / "chat_tiny.yaml")
ROWS = [
    {"prompt": "what is one plus two ?", "response": "one plus two is three ."},
    {"messages": [{"role": "system", "content": "be short ."}, {"role": "user", "content": "say hi ."},
                  {"role": "assistant", "content": "hi ."}, {"role": "user", "content": "say bye ."},
                  {"role": "assistant", "content": "bye bye ."}]},
    {"prompt": "what is two plus two ?", "response": "two plus two is four ."},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def save_tokenizer(path: Path, template=True) -> Path:
    texts = [m for r in ROWS for m in ([r.get("prompt", ""), r.get("response", "")] +
                                       [t["content"] for t in r.get("messages", [])])]
    tok = word_level_tokenizer(texts + ["three four"], **({} if template else {"chat_template": None}))
    tok.save_pretrained(path)
    return path


def no_mask_tokenizer():
    """A word-level tokenizer with a chat template and no mask token (as Qwen's, Llama's)."""
    import tokenizers  # lazy: imported (or skipped) at the top
    words = ["[PAD]", "[UNK]", "<|end|>"] + sorted({w for r in ROWS for w in json.dumps(r).split()})
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]",
                                               eos_token="<|end|>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} <|end|> {% endfor %}"
    return tok


def chat_overrides(tmp_path, name, *extra):
    """A chat_tiny run small enough for a test (a few seconds)."""
    return [f"task.path={EXAMPLE}", f"task.tokenizer={EXAMPLE_TOKENIZER}", "model.from_config.hidden_size=32",
            "model.from_config.intermediate_size=64", "model.from_config.num_hidden_layers=1", "train.steps=6",
            "train.warmup_steps=1", "train.batch_size=8", "train.progress=false", "train.checkpoint_every=6",
            "eval.n=8", f"out_dir={tmp_path}", f"name={name}", *extra]


def train_chat(tmp_path, name, *extra) -> Path:
    return train(load_config(CHAT_CONFIG, chat_overrides(tmp_path, name, *extra)))


def test_rows_render_with_the_chat_template_and_answer_only_the_response(tmp_path):
    tok_dir = save_tokenizer(tmp_path / "tok")
    task = build_task({"name": "chat", "path": str(write_jsonl(tmp_path / "d.jsonl", ROWS)), "tokenizer": str(tok_dir),
                       "seq_len": 40, "val_frac": 0.0})
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    x0, answer = task.rows("train")
    assert x0.shape == (3, 40) and task.mask_id == tok.mask_token_id and task.pad_id == tok.pad_token_id
    texts = [tok.decode(x0[b][answer[b]].tolist()) for b in range(3)]
    assert texts == ["one plus two is three. <|end|>", "bye bye. <|end|>", "two plus two is four. <|end|>"]
    # the prompt is exactly what `anyorder generate --chat` decodes after; the rest is padding
    first = int(answer[0].nonzero()[0])
    assert x0[0, :first].tolist() == generation_prompt_ids(tok, ROWS[0]["prompt"], chat=True)
    assert tok.decode(x0[1, : int(answer[1].nonzero()[0])].tolist()) == \
        "<|system|> be short. <|end|> <|user|> say hi. <|end|> <|assistant|> hi. <|end|> <|user|> say bye. <|end|> <|assistant|>"
    end = first + int(answer[0].sum())
    assert (x0[0, end:] == task.pad_id).all() and not answer[0, end:].any()
    d = task.describe()
    assert (d["template"], d["truncated"], d["dropped"], d["conversations"]) == ("chat_template", 0, 0, {"train": 3, "validation": 0})


def test_objectives_never_mask_or_score_padding_and_normalise_by_response_tokens(tmp_path):
    """Pads are prompt positions (pad_as=context): no order masks or scores them; with
    pad_as=answer they are scored answer positions whose target is the pad id."""
    tok_dir = save_tokenizer(tmp_path / "tok")
    spec = {"name": "chat", "path": str(write_jsonl(tmp_path / "d.jsonl", ROWS)), "tokenizer": str(tok_dir),
            "seq_len": 40, "val_frac": 0.0}
    task = build_task(spec)
    x0, answer = task.rows("train")
    pads = (x0 == task.pad_id) & ~answer
    assert pads.sum() > 40
    for name in ("random", "ar", "block", "prefix_block"):
        order = build_order({"name": name, "block_size": 4} if "block" in name else name)
        plan = order.train_plan(x0, order.layout(answer), task.mask_id, torch.Generator().manual_seed(0))
        assert not plan.scored[pads].any() and torch.equal(plan.answer, answer)
        assert (plan.tokens[:, :40][pads] == task.pad_id).all()      # never replaced by [MASK]
    x1, a1 = build_task({**spec, "pad_as": "answer"}).rows("train")
    assert torch.equal(x1, x0) and torch.equal(a1, answer | pads) and a1[:, -1].all()


def test_plain_concatenation_without_a_template_packing_and_truncation(tmp_path):
    tok_dir = save_tokenizer(tmp_path / "tok", template=False)
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    task = build_task({"name": "chat", "path": str(data), "tokenizer": str(tok_dir), "seq_len": 24, "val_frac": 0.0})
    x0, answer = task.rows("train")
    assert task.template == "plain"
    prompt = tok("what is one plus two ?")["input_ids"]
    assert x0[0, :len(prompt)].tolist() == prompt and not answer[0, :len(prompt)].any()
    assert x0[0][answer[0]].tolist() == tok("one plus two is three .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # packing: the same conversations in fewer rows, each keeping its answer tokens
    spec = {"name": "chat", "path": str(data), "tokenizer": str(tok_dir), "seq_len": 28, "val_frac": 0.0}
    x0, answer = build_task(spec).rows("train")
    px, pa = build_task({**spec, "pack": True}).rows("train")
    assert (len(x0), len(px)) == (3, 2) and int(pa.sum()) == int(answer.sum())
    assert sorted(px[pa].tolist()) == sorted(x0[answer].tolist())
    # a row cut at seq_len keeps its first ids (truncated); one whose prompt fills the row is dropped
    short = build_task({"name": "chat", "path": str(data), "tokenizer": str(tok_dir), "seq_len": 9, "val_frac": 0.0})
    d = short.describe()
    assert (d["truncated"], d["dropped"], d["conversations"]["train"]) == (2, 1, 2)
    sx, sa = short.rows("train")
    assert sx.shape == (2, 9) and sa[:, -1].all() and sx[0, : len(prompt)].tolist() == prompt


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "hi"', "d.jsonl:2: not valid JSON"),
    ('{"question": "hi"}', "d.jsonl:2: a row needs keys 'prompt' and 'response', or 'messages'; got keys \\['question'\\]"),
    ('{"prompt": "hi", "response": 3}', "d.jsonl:2: key 'response' must be a string, got 3"),
    ('{"prompt": "hi", "response": "  "}', "d.jsonl:2: key 'response': the response is empty"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}',
     "d.jsonl:2: key 'messages\\[1\\]' must be"),
    ('{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]}',
     "d.jsonl:2: key 'messages': the last message is the answer and must have role 'assistant', got 'user'"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}',
     "d.jsonl:2: key 'messages\\[1\\].content': the response is empty"),
])
def test_bad_rows_name_the_line_and_key(tmp_path, line, message):
    tok_dir = save_tokenizer(tmp_path / "tok")
    data = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], line])
    with pytest.raises(ValueError, match=message):
        build_task({"name": "chat", "path": str(data), "tokenizer": str(tok_dir)})


def test_a_template_that_fails_on_a_row_names_the_row(tmp_path):
    tok = word_level_tokenizer(["a b"], chat_template="{{ raise_exception('system turns only') }}")
    tok.save_pretrained(tmp_path / "tok")
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(ValueError, match="d.jsonl:1: the tokenizer's chat template cannot render this row: "
                                         "TemplateError: system turns only"):
        build_task({"name": "chat", "path": str(data), "tokenizer": str(tmp_path / "tok")})


def test_missing_files_and_bad_options_are_one_line_errors(tmp_path):
    tok_dir = save_tokenizer(tmp_path / "tok")
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(FileNotFoundError, match="task.path '.*missing.jsonl' is not a file"):
        build_task({"name": "chat", "path": str(tmp_path / "missing.jsonl"), "tokenizer": str(tok_dir)})
    with pytest.raises(ValueError, match="task.tokenizer '.*nowhere' holds no loadable tokenizer"):
        build_task({"name": "chat", "path": str(data), "tokenizer": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match="needs exactly one of task.path .* and task.hub"):
        build_task({"name": "chat", "tokenizer": str(tok_dir)})
    with pytest.raises(ValueError, match="task.pad_as must be one of 'context', 'answer', got 'left'"):
        build_task({"name": "chat", "path": str(data), "tokenizer": str(tok_dir), "pad_as": "left"})
    task = build_task({"name": "chat", "path": str(data), "tokenizer": str(tok_dir), "val_frac": 0.0})
    with pytest.raises(ValueError, match="no 'validation' rows .* raise task.val_frac"):
        task.eval_set(4)


def test_a_tokenizer_without_mask_token_gets_one_and_hub_rows_read_through_datasets(tmp_path):
    pytest.importorskip("datasets")
    tok = no_mask_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    task = build_task({"name": "chat", "path": str(data), "tokenizer": str(tmp_path / "tok"), "val_frac": 0.0})
    assert task.mask_id == len(tok) and task.vocab_size == len(tok) + 1
    assert task.hf_tokenizer.convert_ids_to_tokens(task.mask_id) == "[MASK]"
    hub = build_task({"name": "chat", "tokenizer": str(tmp_path / "tok"), "val_frac": 0.0,
                      "hub": {"path": "json", "data_files": str(data), "cache_dir": str(tmp_path / "cache")}})
    assert torch.equal(hub.rows("train")[0], task.rows("train")[0])


def test_example_tokenizer_rebuilds_and_the_tiny_config_trains(tmp_path):
    """data/examples/chat_tokenizer is what save_example_tokenizer makes of chat.jsonl; a short
    run of configs/hf/chat_tiny.yaml records the row counts in run.json and evaluates."""
    rebuilt = save_example_tokenizer(str(EXAMPLE), str(tmp_path / "tok"))
    shipped = transformers.AutoTokenizer.from_pretrained(EXAMPLE_TOKENIZER)
    assert rebuilt.get_vocab() == shipped.get_vocab() and rebuilt.chat_template == shipped.chat_template
    assert sum(1 for line in EXAMPLE.read_text().splitlines() if line.strip()) == 50
    run = train_chat(tmp_path, "c")
    info = json.loads((run / "run.json").read_text())
    task = info["run_info"]["task"]
    assert task["conversations"]["train"] + task["conversations"]["validation"] == 50 and task["truncated"] == 0
    summary = json.loads((run / "summary.json").read_text())
    assert 0.0 <= summary["eval"]["val_token_acc"] <= 1.0


def test_continued_pretraining_on_text_with_the_models_own_tokenizer(tmp_path):
    """Plain text through the text task with `tokenizer: {name: hf, path: DIR}`: the rows hold the
    model tokenizer's ids (documents end with its EOS) and an hf-backbone config trains on them."""
    tok_dir = save_tokenizer(tmp_path / "tok")
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    lines = [f"{a} plus {b} is {c} ." for a, b, c in [("one", "two", "three"), ("two", "two", "four")] * 20]
    (tmp_path / "t.txt").write_text("\n".join(lines) + "\n")
    task = {"name": "text", "sources": [{"name": "files", "paths": [str(tmp_path / "t.txt")], "per_line": True}],
            "zero_shot": None, "tokenizer": {"name": "hf", "path": str(tok_dir)}, "seq_len": 16,
            "val_frac": 0.2, "test_frac": 0.1, "cache_dir": str(tmp_path / "cache")}
    built = build_task(task)
    assert (built.mask_id, built.vocab_size) == (tok.mask_token_id, len(tok)) and built.hf_tokenizer is not None
    x0, answer = built.rows("train")
    stream = tok(lines[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert answer.all() and tok.eos_token_id in x0[0].tolist()
    assert any(x0.view(-1)[i: i + len(stream)].tolist() == stream for i in range(x0.numel() - len(stream)))
    run = train(load_config(CHAT_CONFIG, chat_overrides(tmp_path, "text")[2:] + [f"task={json.dumps(task)}"]))
    assert json.loads((run / "run.json").read_text())["run_info"]["task"]["tokenizer"]["name"] == "hf"


def test_the_large_model_recipes_validate_and_build_on_stand_ins(tmp_path):
    """configs/hf/qwen_block.yaml builds with a tiny Qwen2 in place of Qwen2.5-0.5B (a tied head, a
    tokenizer without a mask token: one is added); configs/hf/llada_lora.yaml passes every check
    that needs no checkpoint."""
    from anyorder.experiment import build  # lazy: only this test builds without training
    from anyorder.model.hf_backbone import check_hf_options  # lazy: as above
    plain = no_mask_tokenizer()
    d = tmp_path / "qwen"
    plain.save_pretrained(d)
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=len(plain) + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True)).save_pretrained(d)
    cfg = load_config(str(ROOT / "configs" / "hf" / "qwen_block.yaml"), [
        f"task.path={write_jsonl(tmp_path / 'd.jsonl', ROWS * 4)}", f"task.tokenizer={d}", f"model.path={d}",
        "task.seq_len=48", "task.val_frac=0.2"])
    exp = build(cfg)
    assert exp.order.name == "block" and exp.task.template == "chat_template" and exp.task.pack
    assert sum(exp.task.n_rows.values()) == 12 and exp.task.truncated == 0
    assert exp.task.mask_id == len(plain) < exp.model.cfg.vocab_size     # an unused row of the table
    assert exp.model.hf.config.tie_word_embeddings
    llada = load_config(str(ROOT / "configs" / "hf" / "llada_lora.yaml"))
    opts = check_hf_options({k: v for k, v in llada["model"].items() if k != "backbone"})
    assert opts["trust_remote_code"] and opts["lora"]["r"] == 16 and llada["task"]["mask_id"] == 126336
