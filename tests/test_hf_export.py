"""`anyorder export RUN --out DIR` writes a Hugging Face directory (safetensors, tokenizer,
anyorder.json) that `anyorder generate --model DIR` decodes exactly as the run itself does."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from anyorder.cli import main  # noqa: E402
from anyorder.config import load_config  # noqa: E402
from anyorder.data.chat_format import generation_prompt_ids  # noqa: E402
from anyorder.decoding import build_decoder  # noqa: E402
from anyorder.experiment import load_run, train  # noqa: E402
from anyorder.orders import build_order  # noqa: E402
from anyorder.adapters.hf_generate import load_generator  # noqa: E402
from test_hf_data import ROOT, train_chat  # noqa: E402

PROMPTS = ["What is two plus two?", "Which animal says moo?"]


def decode_run(exp, prompt, order, decoder, gen_length, seed):
    """The run's own model decoding one chat prompt (what generate must reproduce)."""
    ids = generation_prompt_ids(exp.task.hf_tokenizer, prompt, chat=True)
    x = torch.tensor([ids + [exp.task.mask_id] * gen_length])
    answer = torch.zeros_like(x, dtype=torch.bool)
    answer[:, len(ids):] = True
    with torch.no_grad():
        res = build_decoder(decoder).decode(exp.model, build_order(order), x, answer, row_seeds=[seed])
    return res.tokens[0, len(ids):].tolist()


def generate_json(capsys, model_dir, *args):
    argv = ["generate", "--model", str(model_dir), "--gen-length", "6", "--json", *args]
    assert main(argv + [a for p in PROMPTS for a in ("--prompt", p)]) == 0
    return json.loads(capsys.readouterr().out)


def test_export_then_generate_gives_the_runs_own_tokens(tmp_path, capsys):
    run = train_chat(tmp_path, "full")
    out = tmp_path / "hf"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert "exported to" in capsys.readouterr().out
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    info = json.loads((out / "anyorder.json").read_text())
    exp = load_run(run)
    assert (info["order"], info["mask_id"], info["shift_logits"], info["chat"]) == \
        ({"name": "random"}, exp.task.mask_id, False, True)
    assert info["config"]["task"]["name"] == "chat" and info["lora_merged"] is False
    # defaults from anyorder.json: the run's order, first decoder, mask id, shift and chat template
    rows = generate_json(capsys, out)
    for row, prompt in zip(rows, PROMPTS):
        assert row["tokens"] == decode_run(exp, prompt, {"name": "random"}, {"name": "top_prob"}, 6, 0)
        assert row["text"] == exp.task.hf_tokenizer.decode(row["tokens"], skip_special_tokens=True)
    # a flag overrides the record: another order and a sampling decoder, same tokens both ways
    rows = generate_json(capsys, out, "--order", "{name: block, block_size: 2}", "--decoder",
                         "{name: top_prob, temperature: 1.0}", "--seed", "3")
    for b, (row, prompt) in enumerate(zip(rows, PROMPTS)):
        assert row["tokens"] == decode_run(exp, prompt, {"name": "block", "block_size": 2},
                                           {"name": "top_prob", "temperature": 1.0}, 6, 3 + b)
    # the saved directory loads as a plain transformers model with the run's weights
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(hf.lm_head.weight, exp.model.hf.lm_head.weight)


def test_lora_export_is_merged_and_reproduces_the_adapted_logits(tmp_path):
    pytest.importorskip("peft", reason="LoRA needs peft (`pip install peft`, in the test extra)")
    run = train_chat(tmp_path, "lora", "model.lora={r: 4}", "train.lr=0.05")
    out = tmp_path / "hf"
    assert main(["export", str(run), "--out", str(out)]) == 0
    exp = load_run(run)
    model, tok = load_generator(str(out))
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert json.loads((out / "anyorder.json").read_text())["lora_merged"] is True
    x0, answer = exp.task.eval_set(4)
    x = torch.where(answer, torch.full_like(x0, exp.task.mask_id), x0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), exp.model(x), rtol=1e-5, atol=1e-5)


def test_export_errors_name_the_fix(tmp_path, capsys):
    run = train_chat(tmp_path, "full")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["export", str(run), "--out", str(out)]) == 2
    assert "exists and is not an empty directory: choose another or pass --force" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(out), "--force"]) == 0 and not (out / "keep.txt").exists()
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "hi", "--device", "gpu9"]) == 2
    assert "--device 'gpu9' is not a device" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    sudoku = train(load_config(str(ROOT / "configs" / "hf" / "sudoku4_llama.yaml"), [
        "task.n_train=64", "task.n_eval=8", "model.from_config.hidden_size=16", "model.from_config.intermediate_size=32",
        "model.from_config.num_hidden_layers=1", "train.steps=1", "train.warmup_steps=0", "train.batch_size=4",
        "train.progress=false", "train.checkpoint_every=1", "eval.n=4", f"out_dir={tmp_path}", "name=sudoku"]))
    capsys.readouterr()
    assert main(["export", str(sudoku), "--out", str(tmp_path / "o3")]) == 2
    assert "adds extra embeddings (row, col, box, segment) that a Hugging Face directory cannot hold" in capsys.readouterr().err
