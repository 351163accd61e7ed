"""Teacher-forced accuracy along the answer, and the star graph's per-step metrics."""
import torch
import pytest

from anyorder.analysis.teacher_forced import teacher_forced_accuracy
from anyorder.model import ModelConfig, Transformer
from anyorder.orders import build_order
from anyorder.tasks import build_task

MASK = 9


class CopyLeft(torch.nn.Module):
    """Predicts, at every position, the token just left of it: an oracle whose teacher-forced
    accuracy is known by hand. Records the inputs it was given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, attn_mask=None, extra=None):
        self.seen.append(x.clone())
        left = torch.cat([x[:, :1], x[:, :-1]], dim=1)
        return torch.nn.functional.one_hot(left, MASK + 1).float()


def test_teacher_forcing_gives_the_true_prefix_and_masks_the_rest():
    x0 = torch.tensor([[1, 2, 2, 2, 5], [3, 3, 4, 4, 4]])
    answer = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]]).bool()
    answer[1, 1] = False  # both rows: 3 answer positions
    answer[1, 4] = True
    model = CopyLeft()
    acc = teacher_forced_accuracy(model, build_order("random"), x0, answer, MASK)
    # row 0 answers 2,2,5 after 1,2 (copy-left right, right, wrong); row 1 answers 4,4,4 after 3,3 (wrong, right, right)
    assert acc.tolist() == [0.5, 1.0, 0.5]
    # step j: the prompt and the true answer before j, [MASK] from j on
    assert model.seen[1].tolist() == [[1, 2, 2, MASK, MASK], [3, 3, 4, MASK, MASK]]
    uneven = answer.clone()
    uneven[0, 4] = False
    with pytest.raises(ValueError, match="same number of answer positions"):
        teacher_forced_accuracy(model, build_order("random"), x0, uneven, MASK)


def test_under_ar_it_is_teacher_forced_next_token_accuracy():
    """Under AR's causal attention a query sees only the true tokens to its left: check against
    that plain definition, row by row and position by position, with the true suffix present."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=10, mask_id=MASK, d_model=32, n_layers=2, n_heads=2, max_len=32)).eval()
    order = build_order("ar")
    x0 = torch.randint(0, 9, (6, 12))
    answer = torch.zeros(6, 12, dtype=torch.bool)
    answer[:, 5:] = True
    acc = teacher_forced_accuracy(model, order, x0, answer, MASK)
    want = torch.zeros(7, dtype=torch.float64)
    for b in range(6):
        for j in range(7):
            pos = 5 + j
            x = x0[b:b + 1].clone()
            x[0, pos] = MASK  # the true suffix stays: AR's causal attention must ignore it
            masked = torch.zeros_like(answer[b:b + 1])
            masked[0, pos:] = True
            layout = order.layout(answer[b:b + 1])
            logits = model(x, attn_mask=order.decode_attention(masked, layout))
            want[j] += float(logits[0, pos].argmax() == x0[b, pos])
    assert torch.equal(acc, want / 6)


def test_star_graph_reports_decoded_and_teacher_forced_steps():
    task = build_task({"name": "star_graph", "degree": 2, "path_len": 5, "num_nodes": 12, "n_train": 4, "n_eval": 8})
    x0, answer = task.eval_set(8)
    pred = x0.clone()
    pred[:4, task.prompt_len + 2] = task.bar  # step 2 wrong on half the rows
    m = task.metrics(pred, x0, answer)
    assert (m["step1_acc"], m["step2_acc"], m["step3_acc"]) == (1.0, 0.5, 1.0) and "step4_acc" not in m
    assert m["path_acc"] == 0.5
    rev = build_task({"name": "star_graph", "degree": 2, "path_len": 5, "num_nodes": 12, "n_train": 4, "n_eval": 8,
                      "reverse": True})
    xr, ar = rev.eval_set(8)
    pr = xr.clone()
    pr[:4, rev.prompt_len + 3] = rev.bar  # reversed answer: answer index 3 is path step 1
    assert rev.metrics(pr, xr, ar)["step1_acc"] == 0.5
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=task.vocab_size, mask_id=task.mask_id, d_model=16, n_layers=1,
                                    n_heads=2, max_len=64))
    tf = task.model_metrics(model, build_order("ar"), x0, answer)
    acc = teacher_forced_accuracy(model, build_order("ar"), x0, answer, task.mask_id)
    assert tf == {"tf_step1_acc": float(acc[1]), "tf_step2_acc": float(acc[2]), "tf_step3_acc": float(acc[3])}
