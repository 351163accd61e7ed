"""train.gradient_checkpointing: each block's activations are recomputed in the backward pass, and
the loss, the gradients and a trained model are bit-identical to training without it."""
import pytest
import torch

import anyorder.model.transformer as native
from anyorder.config import load_config
from anyorder.experiment import train
from anyorder.model import ModelConfig, Transformer
from anyorder.objectives.nelbo import plan_loss
from anyorder.orders import build_order
from anyorder.train.config import TrainConfig
from anyorder.train.recompute import enable_gradient_checkpointing

from conftest import make_batch
from test_sweep import ROOT, TINY


def loss_and_grads(model, spec, seed=3):
    x0, answer = make_batch(B=4, L=14, prompt=3)
    order = build_order(spec)
    plan = order.train_plan(x0, order.layout(answer), model.cfg.mask_id, torch.Generator().manual_seed(seed))
    model.zero_grad()
    loss, _ = plan_loss(model, plan)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("spec", ["random", {"name": "block", "block_size": 4}])
def test_native_blocks_recompute_and_gradients_are_bit_identical(spec, monkeypatch):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=9, mask_id=8, d_model=32, n_layers=3, n_heads=2, max_len=64)).train()
    plain = loss_and_grads(model, spec)
    calls = []
    monkeypatch.setattr(native, "checkpoint", lambda fn, *a, **k: calls.append(fn) or torch.utils.checkpoint.checkpoint(fn, *a, **k))
    enable_gradient_checkpointing(model)
    ckpt = loss_and_grads(model, spec)
    assert calls == list(model.blocks)  # every block, once per pass
    assert torch.equal(plain[0], ckpt[0]) and plain[1].keys() == ckpt[1].keys()
    assert all(torch.equal(plain[1][n], ckpt[1][n]) for n in plain[1])


def test_hugging_face_layers_recompute_with_the_same_gradients():
    pytest.importorskip("transformers")
    from test_hf_backbone import backbone

    model = backbone("llama").train()
    plain = loss_and_grads(model, "random")
    enable_gradient_checkpointing(model)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.hf.modules())  # the layers recompute
    ckpt = loss_and_grads(model, "random")
    assert torch.equal(plain[0], ckpt[0])
    for n in plain[1]:
        torch.testing.assert_close(plain[1][n], ckpt[1][n], rtol=0, atol=1e-7)


def test_a_trained_run_is_bit_identical_with_checkpointing(tmp_path):
    over = TINY + ["train.steps=4", "train.checkpoint_every=0"]
    runs = {}
    for on in (False, True):
        cfg = load_config(ROOT / "configs" / "sudoku4.yaml", over + [f"train.gradient_checkpointing={str(on).lower()}",
                                                                     f"out_dir={tmp_path}", f"name=gc{int(on)}"])
        runs[on] = train(cfg)
    from safetensors.torch import load_file
    a, b = (load_file(str(runs[on] / "model.safetensors")) for on in (False, True))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_errors_name_the_key():
    with pytest.raises(ValueError, match="gradient_checkpointing must be true or false, got 'yes'"):
        TrainConfig(gradient_checkpointing="yes")
    with pytest.raises(ValueError, match=r"train.gradient_checkpointing=true: the model \(Linear\) has no set_gradient_checkpointing"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))
