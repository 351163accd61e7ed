"""Every tensor a decode creates lives on the model's device (issue #10 item 2).

A ``TorchFunctionMode`` records each tensor factory call (torch.zeros / ones / full / empty /
arange / tensor / rand* / ...) made while every registered decoder decodes under every order;
a factory call without ``device=`` (or with another device than the model's) fails the test.
Tensors derived from existing ones (``*_like``, ``new_*``, indexing, arithmetic) inherit their
device and are not factory calls. On this CPU-only suite the check is that each factory call
says its device; the same decode then runs on a GPU without creating host tensors per step.
"""
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

from anyorder.decoding import DECODERS, build_decoder
from anyorder.model import ModelConfig, Transformer
from anyorder.orders import build_order

from conftest import make_batch

FACTORIES = {torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.tensor, torch.as_tensor,
             torch.rand, torch.randn, torch.randint, torch.randperm, torch.eye, torch.linspace, torch.logspace,
             torch.empty_strided, torch.scalar_tensor}


class FactoryRecorder(TorchFunctionMode):
    """Records (function name, device given, where called) of every factory call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES:
            caller = traceback.extract_stack(limit=2)[0]
            where = f"{caller.filename}:{caller.lineno} {caller.line}"
            self.calls.append((func.__name__, kwargs.get("device"), where))
        return func(*args, **kwargs)


def _without_device(calls, device):
    return [c for c in calls if c[1] is None or torch.device(c[1]).type != torch.device(device).type]


BUILTIN = ["ancestral", "beam", "edit", "entropy", "jigsaw_entropy", "left_to_right", "margin", "random",
           "random_init", "remask", "scatter_offsets", "threshold", "top_prob"]
ORDERS = ["random", "ar", {"name": "block", "block_size": 4}, {"name": "prefix_block", "block_size": 4},
          {"name": "jigsaw", "block_size": 4}, {"name": "scatter", "block_size": 4}]
EXTRA = [{"name": "top_prob", "temperature": 1.0, "top_k": 3, "top_p": 0.9}, {"name": "threshold", "tau": 0.3},
         {"name": "margin", "steps": 9, "window": 4, "temperature": 0.7}, {"name": "ancestral", "temperature": 1.0},
         {"name": "top_prob", "cache": True}, {"name": "threshold", "tau": 0.5, "cache": True}]


def _decode_all(model, specs, orders):
    dev = next(model.parameters()).device
    x0, answer = make_batch(B=3, L=14, prompt=3)
    answer[1, 3] = False                                    # rows finish at different times
    x = torch.where(answer, torch.full_like(x0, model.cfg.mask_id), x0).to(dev)
    answer = answer.to(dev)
    rec = FactoryRecorder()
    for o in orders:
        order = build_order(dict(o) if isinstance(o, dict) else o)
        for spec in specs:
            dec = build_decoder(dict(spec))
            with rec:
                dec.decode(model, order, x, answer, row_seeds=[1, 2, 3])
    return rec.calls


def test_every_builtin_decoder_is_checked():
    assert set(BUILTIN) | {"learned_ancestral", "learned_velocity"} <= set(DECODERS.names())


def test_decoders_create_tensors_on_the_model_device(tiny_model):
    calls = _decode_all(tiny_model, [{"name": n} for n in BUILTIN] + EXTRA, ORDERS)
    assert len(calls) > 100  # the recorder sees the loop's factories (it is not vacuous)
    bad = _without_device(calls, "cpu")
    assert not bad, "factory calls without the model's device:\n" + "\n".join(f"{n}: {w}" for n, _, w in bad[:20])


def test_learned_decoders_create_tensors_on_the_model_device():
    lo = build_order("learned")
    torch.manual_seed(1)
    lomdm = lo.wrap(Transformer(ModelConfig(vocab_size=9, mask_id=8, d_model=32, n_layers=2, n_heads=2,
                                            max_len=64))).eval()
    calls = _decode_all(lomdm, [{"name": "learned_ancestral"}, {"name": "learned_velocity"}], ["learned"])
    bad = _without_device(calls, "cpu")
    assert not bad, "\n".join(f"{n}: {w}" for n, _, w in bad[:20])


def test_the_recorder_catches_a_factory_without_device():
    rec = FactoryRecorder()
    with rec:
        torch.zeros(3)
        torch.arange(4, device="cpu")
        torch.ones(2).new_zeros(3)  # derived: not a factory call
    assert [(n, d) for n, d, _ in rec.calls] == [("zeros", None), ("arange", "cpu"), ("ones", None)]
    assert [n for n, _, _ in _without_device(rec.calls, "cpu")] == ["zeros", "ones"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_decoders_run_on_the_gpu(tiny_model):
    model = tiny_model.cuda()
    calls = _decode_all(model, [{"name": n} for n in BUILTIN] + EXTRA, ORDERS)
    bad = _without_device(calls, "cuda")
    assert not bad, "\n".join(f"{n}: {w}" for n, _, w in bad[:20])


def test_decoders_on_a_hugging_face_backbone_create_tensors_on_its_device():
    """The same check through the Hugging Face wrapper (a tiny random Llama): the wrapper's masks,
    positions and cache are made on the model's device too."""
    pytest.importorskip("transformers")
    from test_hf_backbone import backbone

    calls = _decode_all(backbone("llama"), [{"name": n} for n in BUILTIN] + EXTRA, ORDERS)
    assert len(calls) > 100  # the recorder sees the loop's factories (it is not vacuous)
    bad = _without_device(calls, "cpu")
    assert not bad, "factory calls without the model's device:\n" + "\n".join(f"{n}: {w}" for n, _, w in bad[:20])
