"""`anyorder generate` on a local Hugging Face directory, and `anyorder train` with the hf backbone:
tiny random models and a word-level tokenizer saved to tmp_path (nothing downloaded)."""
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from anyorder.cli import main  # noqa: E402
from anyorder.config import load_config  # noqa: E402
from anyorder.experiment import evaluate, load_run, train  # noqa: E402
from anyorder.objectives.nelbo import NelboObjective  # noqa: E402
from anyorder.train.files import load_tensors  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["[PAD]", "[UNK]"] + [f"w{i}" for i in range(37)]


def save_model_dir(path: Path, mask: bool = True) -> Path:
    """A tiny random Llama and a whitespace word-level tokenizer (with a [MASK] token or without)."""
    words = WORDS + (["[MASK]"] if mask else [])
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tk.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]",
                                               **({"mask_token": "[MASK]"} if mask else {}))
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def test_generate_ar_equals_transformers_greedy_and_reports_the_trace(tmp_path, capsys):
    d = save_model_dir(tmp_path / "llama")
    prompts = ["w1 w2 w3", "w4 w5 w6 w7 w8"]
    args = ["generate", "--model", str(d), "--order", "{name: ar, prompt: causal}", "--decoder", "left_to_right",
            "--gen-length", "5"] + [a for p in prompts for a in ("--prompt", p)]
    assert main(args + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    for row, prompt in zip(rows, prompts):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        ref = hf.generate(input_ids=ids, max_new_tokens=5, do_sample=False, suppress_tokens=[tok.mask_token_id])
        assert row["tokens"] == ref[0, ids.shape[1]:].tolist()
        assert (row["nfe"], row["afp"], row["kendall_tau"]) == (5, 1.0, 1.0)
        assert row["text"] == tok.decode(row["tokens"]) and row["text"].startswith("w")
    cached = [a if a != "left_to_right" else "{name: left_to_right, cache: true}" for a in args]
    assert main(cached + ["--json"]) == 0           # the exact KV cache: the same tokens
    assert [r["tokens"] for r in json.loads(capsys.readouterr().out)] == [r["tokens"] for r in rows]
    assert main(args) == 0                          # plain mode: one line of text per prompt
    assert capsys.readouterr().out.splitlines() == [r["text"] for r in rows]
    # a parallel decoder under random order runs too (any order, any decoder)
    assert main(["generate", "--model", str(d), "--prompt", "w1 w2", "--decoder", "{name: top_prob, k: 2}",
                 "--gen-length", "4", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["nfe"] == 2 and row["afp"] == 2.0 and len(row["tokens"]) == 4


def test_generate_errors_name_the_fix(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "w1"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    d = save_model_dir(tmp_path / "nomask", mask=False)
    assert main(["generate", "--model", str(d), "--prompt", "w1"]) == 2
    assert "no mask token; pass --mask-id ID" in capsys.readouterr().err
    assert main(["generate", "--model", str(d), "--prompt", "w1", "--add-mask-token", "--gen-length", "2",
                 "--json"]) == 0                    # a new [MASK] row: the embeddings grow by one
    assert len(json.loads(capsys.readouterr().out)[0]["tokens"]) == 2
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "my_custom", "auto_map": {
        "AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyModel"}}))
    assert main(["generate", "--model", str(remote), "--prompt", "w1"]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err


def hf_overrides(tmp_path, name):
    return ["task.n_train=200", "task.n_eval=32", "model.from_config.hidden_size=32",
            "model.from_config.intermediate_size=64", "model.from_config.num_hidden_layers=1",
            "train.steps=6", "train.warmup_steps=1", "train.batch_size=8", "train.progress=false",
            "train.precision=fp32", "train.checkpoint_every=3", "eval.n=16", f"out_dir={tmp_path}", f"name={name}"]


def test_train_checkpoints_and_resumes_to_identical_parameters(tmp_path, monkeypatch, capsys):
    config = str(ROOT / "configs" / "hf" / "sudoku4_llama.yaml")
    assert main(["train", config] + hf_overrides(tmp_path, "a")) == 0
    a = tmp_path / "a"
    assert (a / "checkpoint").exists() and (a / "model.safetensors").exists()

    real = NelboObjective.loss

    def interrupted(self, model, batch_size, gen, step):  # Ctrl-C during step 5 (steps count from 0)
        if step == 4:
            raise KeyboardInterrupt
        return real(self, model, batch_size, gen, step)

    monkeypatch.setattr(NelboObjective, "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(config, hf_overrides(tmp_path, "b")))
    monkeypatch.setattr(NelboObjective, "loss", real)
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 4
    assert main(["train", config] + hf_overrides(tmp_path, "b")) == 0
    wa, wb = load_tensors(a / "model.safetensors"), load_tensors(tmp_path / "b" / "model.safetensors")
    assert sorted(wa) == sorted(wb) and any(k.startswith("hf.model.layers.0.") for k in wa)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the extra (Sudoku row/column/box) embeddings trained away from their zero start
    assert float(wa["extra.row.weight"].abs().max()) > 0
    exp = load_run(a)
    assert type(exp.model).__name__ == "HFBackbone"
    res = evaluate(exp, {"name": "margin"}, n=8)
    assert res["nfe"] == 16.0 and 0.0 <= res["cell_acc"] <= 1.0


def test_config_model_section_follows_its_backbone(tmp_path):
    config = str(ROOT / "configs" / "hf" / "sudoku4_llama.yaml")
    cfg = load_config(config)
    assert cfg["model"]["backbone"] == "hf" and cfg["model"]["attn_implementation"] == "sdpa"
    assert "d_model" not in cfg["model"]                 # the native keys do not apply
    with pytest.raises(ValueError, match="unknown config key 'model.d_model'.*Valid keys in model: attn_implementation"):
        load_config(config, ["model={backbone: hf, d_model: 3}"])
    with pytest.raises(ValueError, match="unknown model.backbone 'hff'. Did you mean 'hf'"):
        load_config(config, ["model={backbone: hff}"])
    native = load_config(str(ROOT / "configs" / "sudoku4.yaml"), ["model={backbone: native, d_model: 32}"])
    assert native["model"] == {"backbone": "native", "d_model": 32}      # ModelConfig fills in the rest
    with pytest.raises(ValueError, match="model.dtype must be one of 'float32', 'bfloat16', 'float16', got 'fp8'"):
        train(load_config(config, ["model.dtype=fp8", f"out_dir={tmp_path}"]))
    assert not any(tmp_path.iterdir())                   # refused before a run directory was made


def test_a_saved_model_directory_trains_under_a_config(tmp_path):
    """model.path: the pretrained weights are loaded (sized first on the meta device), the task's ids
    index the model's embeddings, and the zero task embeddings leave its logits as they were."""
    from anyorder.experiment import build  # lazy: only this test builds without training
    d = save_model_dir(tmp_path / "llama")
    exp = build(load_config(str(ROOT / "configs" / "hf" / "sudoku4_llama.yaml"),
                            [f"model={{backbone: hf, path: {d}}}", "task.n_train=64", "task.n_eval=8"]))
    hf = transformers.AutoModelForCausalLM.from_pretrained(d)
    assert torch.equal(exp.model.hf.lm_head.weight, hf.lm_head.weight)
    x0, answer = exp.task.train_batch(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = exp.model(x0, extra=exp.objective.extra)
        ref = hf(input_ids=x0, attention_mask=torch.ones(2, 1, x0.shape[1], x0.shape[1], dtype=torch.bool)).logits
    keep = torch.arange(ref.shape[-1]) != exp.model.cfg.mask_id
    torch.testing.assert_close(ours[..., keep], ref[..., keep], rtol=1e-5, atol=1e-5)
    loss, _ = exp.objective.loss(exp.model, 4, torch.Generator().manual_seed(1), 0)
    loss.backward()
    assert torch.isfinite(loss) and exp.model.extra["row"].weight.grad.abs().sum() > 0


def test_learned_order_asks_for_the_native_backbone(tmp_path):
    with pytest.raises(ValueError, match="order 'learned' \\(LoMDM\\) needs the native backbone.*model.backbone=native"):
        train(load_config(str(ROOT / "configs" / "hf" / "sudoku4_llama.yaml"), ["order.name=learned", f"out_dir={tmp_path}"]))
    assert not any(tmp_path.iterdir())
