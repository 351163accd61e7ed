"""LoRA through peft (model.lora): only the adapters (and the mask token's embedding row) train,
and merging the adapters reproduces the adapted model's logits."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft", reason="LoRA needs peft (`pip install peft`, in the test extra)")

from anyorder.config import load_config  # noqa: E402
from anyorder.experiment import build, load_run  # noqa: E402
from anyorder.model.hf_backbone import build_hf_backbone  # noqa: E402
from anyorder.model.lora import has_lora, is_trained, merge_lora  # noqa: E402
from anyorder.train.files import load_tensors  # noqa: E402
from test_hf_data import CHAT_CONFIG, chat_overrides, train_chat  # noqa: E402

LORA = ["model.lora={r: 4, alpha: 8}", "train.lr=0.05"]


def test_lora_training_changes_only_adapters_and_the_mask_row(tmp_path):
    run = train_chat(tmp_path, "lora", *LORA)
    init = build(load_config(CHAT_CONFIG, chat_overrides(tmp_path, "lora", *LORA))).model.state_dict()
    trained = load_tensors(run / "model.safetensors")
    assert sorted(trained) == sorted(init)
    changed = {k for k in init if not torch.equal(init[k], trained[k])}
    adapters = {k for k in init if is_trained(k)}
    assert changed == adapters and any("lora_A" in k for k in adapters) and any("lora_B" in k for k in adapters)
    assert any(k.endswith("q_proj.lora_B.default.weight") for k in adapters)          # all-linear: attention too
    assert any(k.endswith("down_proj.lora_B.default.weight") for k in adapters)       # ... and the MLP
    delta = [k for k in adapters if "trainable_tokens_delta" in k]
    assert len(delta) == 1 and trained[delta[0]].shape[0] == 1                          # one row: [MASK]'s
    # the merged model differs from the base only where adapters act: the embedding's mask row
    exp = load_run(run)
    mask_id = exp.model.cfg.mask_id
    merge_lora(exp.model)
    emb = exp.model.hf.get_input_embeddings().weight
    base = init["hf.model.embed_tokens.token_adapter.base_layer.weight"]
    rows = (emb != base).any(-1).nonzero().view(-1).tolist()
    assert rows == [mask_id]


def test_merged_adapters_reproduce_the_adapted_logits(tmp_path):
    run = train_chat(tmp_path, "lora", *LORA)
    exp = load_run(run)
    x0, answer = exp.task.eval_set(4)
    x = torch.where(answer, torch.full_like(x0, exp.task.mask_id), x0)
    with torch.no_grad():
        adapted = exp.model(x)
        assert has_lora(exp.model)
        merge_lora(exp.model)
        assert not has_lora(exp.model) and all(p.requires_grad for p in exp.model.parameters())
        merged = exp.model(x)
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    base = build(load_config(CHAT_CONFIG, chat_overrides(tmp_path, "lora", *LORA))).model.eval()
    with torch.no_grad():
        keep = torch.arange(adapted.shape[-1]) != exp.task.mask_id
        assert (base(x) - adapted)[..., keep].abs().max() > 1e-2       # the adapters did change the model


def test_tied_embeddings_merge_once(tmp_path):
    """Qwen2.5-0.5B ties its head to the embeddings: the mask row's delta is applied once."""
    spec = {"backbone": "hf", "from_config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                              "num_hidden_layers": 1, "num_attention_heads": 4,
                                              "tie_word_embeddings": True},
            "lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]}}
    torch.manual_seed(0)
    model = build_hf_backbone(spec, vocab_size=20, mask_id=19, max_len=16)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted({n.split(".")[-4] if "lora" in n else "delta" for n in trained}) == ["delta", "q_proj", "v_proj"]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
        x = torch.randint(0, 20, (2, 9))
        x[:, 3] = 19
        adapted = model(x)
        merge_lora(model)
        torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lora, message", [
    ({"rank": 4}, "unknown model.lora option\\(s\\) rank. Valid options: r, alpha, dropout, target_modules, train_mask_row"),
    ({"r": -1}, "model.lora.r must be an integer >= 0, got -1"),
    ({"dropout": 1.5}, "model.lora.dropout must be"),
    ({"target_modules": 3}, "model.lora.target_modules must be 'all-linear', a module-name regex or a list"),
    ({"r": 2, "target_modules": ["wq"]}, "model.lora.target_modules \\['wq'\\] matches no layer of LlamaForCausalLM"),
])
def test_bad_lora_options_are_one_line_errors(tmp_path, lora, message):
    spec = {"backbone": "hf", "from_config": {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                                              "num_hidden_layers": 1, "num_attention_heads": 2}, "lora": lora}
    with pytest.raises(ValueError, match=message):
        build_hf_backbone(spec, vocab_size=20, mask_id=19, max_len=16)


def test_rank_zero_is_no_lora():
    """``r: 0`` (the default of ``model.lora``) adds no adapters: every weight trains."""
    spec = {"backbone": "hf", "from_config": {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                                              "num_hidden_layers": 1, "num_attention_heads": 2}}
    for lora in ({"r": 0, "alpha": 4}, None):
        model = build_hf_backbone({**spec, "lora": lora}, vocab_size=20, mask_id=19, max_len=16)
        assert not has_lora(model) and all(p.requires_grad for p in model.parameters())


def test_an_interrupted_lora_run_resumes_to_the_same_adapters(tmp_path, monkeypatch):
    from anyorder.objectives.nelbo import NelboObjective  # lazy: only this test patches it
    a = train_chat(tmp_path, "a", *LORA)
    real = NelboObjective.loss

    def interrupted(self, model, batch_size, gen, step):   # Ctrl-C during step 4 (steps count from 0)
        if step == 3:
            raise KeyboardInterrupt
        return real(self, model, batch_size, gen, step)

    monkeypatch.setattr(NelboObjective, "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_chat(tmp_path, "b", *LORA, "train.checkpoint_every=2")
    monkeypatch.setattr(NelboObjective, "loss", real)
    b = train_chat(tmp_path, "b", *LORA, "train.checkpoint_every=2")
    assert json.loads((b / "summary.json").read_text())["resumed_from"] is not None   # resumed, not restarted
    wa, wb = load_tensors(a / "model.safetensors"), load_tensors(b / "model.safetensors")
    assert sorted(wa) == sorted(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
