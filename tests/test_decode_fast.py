"""The decoding loop costs its forward passes: log-probs only at the positions a step may commit,
the output head only there, finished rows out of the forward -- and it decodes what it decoded
when it computed everything everywhere.

The reference for "everything everywhere" is the same decoder with a forward that ignores the
``where`` and ``rows`` requests (every row, every position's logits). Tokens, steps and NFE are
identical; confidences differ by float32 rounding: the output head's matmul over a different
number of rows (MKL rounds some row counts differently) and the float32 exps of the top-1
probability's normaliser (dist.py) -- at most a few 1e-8 relative, bounded here by 1e-6.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from anyorder.bench_decode import TimedForward, llada_generate, timed_decoder
from anyorder.decoding import build_decoder
from anyorder.decoding.dist import StepDist, first_max
from anyorder.decoding.forward import uncached_forward
from anyorder.decoding.loop import even_split
from anyorder.model import ModelConfig, Transformer
from anyorder.orders import build_order


def _batch(B=3, L=16, mask_id=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, mask_id, (B, L), generator=g)
    answer = torch.zeros(B, L, dtype=torch.bool)
    answer[:, 4:] = True
    answer[1, 3] = True  # rows with different prompts
    return torch.where(answer, torch.full_like(x, mask_id), x), answer


def _everything_everywhere(*args):
    inner = uncached_forward(*args)
    return lambda x, masked, rows=None, where=None: inner(x, masked) if rows is None else inner(x, masked)[rows]


SPECS = [{"name": n} for n in ["top_prob", "margin", "entropy", "random", "left_to_right", "threshold", "edit",
                               "remask", "random_init", "beam", "ancestral", "jigsaw_entropy", "scatter_offsets"]]
SPECS += [{"name": "top_prob", "k": 2}, {"name": "margin", "temperature": 1.0, "seed": 3},
          {"name": "entropy", "steps": 8, "window": 4}, {"name": "threshold", "tau": 0.2},
          {"name": "top_prob", "temperature": 0.7, "top_k": 3, "top_p": 0.9}]
ORDERS = ["random", "ar", {"name": "block", "block_size": 4}, {"name": "prefix_block", "block_size": 4},
          {"name": "jigsaw", "block_size": 4}, {"name": "scatter", "block_size": 4}]


@pytest.mark.parametrize("order_spec", ORDERS, ids=lambda o: o if isinstance(o, str) else o["name"])
def test_same_decode_as_every_logit_everywhere(tiny_model, order_spec):
    x, answer = _batch()
    order = build_order(dict(order_spec) if isinstance(order_spec, dict) else order_spec)
    worst = 0.0
    for spec in SPECS:
        fast = build_decoder(dict(spec)).decode(tiny_model, order, x, answer, row_seeds=[5, 6, 7])
        ref_dec = build_decoder(dict(spec))
        ref_dec.make_forward = _everything_everywhere
        ref = ref_dec.decode(tiny_model, order, x, answer, row_seeds=[5, 6, 7])
        assert torch.equal(fast.tokens, ref.tokens), spec
        assert torch.equal(fast.trace.finalize_step, ref.trace.finalize_step), spec
        assert torch.equal(fast.trace.nfe, ref.trace.nfe), spec
        rel = ((fast.trace.confidence - ref.trace.confidence).abs() / ref.trace.confidence.clamp_min(1e-300)).max()
        worst = max(worst, float(rel))
    assert worst < 1e-6


def test_step_dist_is_the_full_softmax_at_the_candidates():
    torch.manual_seed(0)
    B, L, V = 3, 7, 50
    logits = torch.randn(B, L, V) * 4
    logits[..., 7] = float("-inf")
    full = F.log_softmax(logits.double(), dim=-1)
    where = torch.rand(B, L) < 0.5
    tokens = logits.argmax(-1)
    for dist in (StepDist(logits, B), StepDist(logits[where], B, where=where)):  # every position / packed
        dist.where = where
        assert torch.equal(dist.logp_at(), full[where])  # bit for bit: rows are reduced on their own
        p = dist.prob_of(tokens)  # float32 exps summed: the float64 softmax's value to ~1e-7 relative
        ref = full.exp().gather(-1, tokens.unsqueeze(-1)).squeeze(-1)[where]
        assert torch.allclose(p[where], ref, rtol=1e-6, atol=0) and (p[~where] == 0).all()
        other = (tokens + 1) % 7  # another token than the argmax
        assert torch.allclose(dist.prob_of(other)[where], full.exp().gather(-1, other.unsqueeze(-1)).squeeze(-1)[where],
                              rtol=1e-6, atol=0)
        sub = where & (torch.arange(L) % 2 == 0)
        assert torch.equal(dist.logits_at(sub), logits[sub])
    rows = torch.tensor([0, 2])  # a row that was not forwarded
    dist = StepDist(logits[rows], B, rows)
    dist.where = where & (torch.arange(B) != 1).unsqueeze(-1)
    assert torch.equal(dist.logp_at(), full[dist.where])
    tok, p = dist.top1()
    assert torch.equal(tok, logits.argmax(-1)[dist.where])
    assert torch.allclose(p, full.max(-1).values.exp()[dist.where], rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="needs_all_logits"):
        StepDist(logits[where], B, where=where).logp()


class _SoftmaxRows(TorchFunctionMode):
    """Counts the rows (positions) every log_softmax / softmax is applied to."""

    def __init__(self):
        super().__init__()
        self.rows = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("log_softmax", "softmax"):
            self.rows += args[0].numel() // args[0].shape[-1]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("spec", [{"name": "top_prob", "steps": 12, "window": 4}, {"name": "margin"},
                                  {"name": "threshold", "tau": 0.3}, {"name": "top_prob", "temperature": 1.0}])
def test_log_probs_only_at_the_commit_candidates(tiny_model, spec):
    """The loop's softmax work is the candidates of each step, not B x L positions per step."""
    x, answer = _batch()
    dec = timed_decoder(spec)
    rec = _SoftmaxRows()
    with rec:
        r = dec.decode(tiny_model, build_order("random"), x, answer, row_seeds=[5, 6, 7])
    steps, B, L = dec.forwards[0].calls, *x.shape
    # every masked answer position is a candidate until it is committed (no window) -> sum over steps
    # of the masked count; with a window only the window's holes
    candidates = int(answer.sum()) * steps
    assert rec.rows <= candidates and rec.rows < B * L * steps / 2
    assert r.trace.nfe.sum() > 0


def test_finished_rows_leave_the_forward(tiny_model):
    """Batched threshold decoding: rows end at different steps; row-passes = the rows' NFE summed."""
    x, answer = _batch(B=4)
    answer[2, 4:10] = False                          # a short answer: row 2 ends early
    x = torch.where(answer, x, torch.where(x == 8, 0, x))
    order = build_order("random")
    spec = {"name": "threshold", "tau": 0.3}
    dec, ref = timed_decoder(spec), timed_decoder(spec, all_rows=True)
    r = dec.decode(tiny_model, order, x, answer, row_seeds=[1, 2, 3, 4])
    r_all = ref.decode(tiny_model, order, x, answer, row_seeds=[1, 2, 3, 4])
    fwd, fwd_all = dec.forwards[0], ref.forwards[0]
    assert len(set(r.trace.nfe.tolist())) > 1                      # rows did finish at different steps
    assert fwd.row_passes == int(r.trace.nfe.sum()) < fwd_all.row_passes == 4 * fwd_all.calls
    assert torch.equal(r.tokens, r_all.tokens) and torch.equal(r.trace.finalize_step, r_all.trace.finalize_step)


@pytest.mark.parametrize("batch", [1, 3])
def test_plain_llada_loop_gives_anyorder_top_prob_tokens(batch):
    """The benchmark's reference loop (LLaDA's low-confidence remasking, written from the paper)
    and anyorder's top_prob with the same schedule decode the same tokens."""
    torch.manual_seed(0)
    V, P, A = 97, 6, 16
    model = Transformer(ModelConfig(vocab_size=V, mask_id=V - 1, d_model=32, n_layers=2, n_heads=2,
                                    max_len=P + A)).eval()
    with torch.no_grad():
        model.head.weight.mul_(10.0)
    g = torch.Generator().manual_seed(batch)
    prompt = torch.randint(0, V - 1, (batch, P), generator=g)
    x = torch.cat([prompt, torch.full((batch, A), V - 1)], dim=1)
    answer = torch.zeros_like(x, dtype=torch.bool)
    answer[:, P:] = True
    for steps, block in ((16, 4), (8, 8), (16, 16)):
        ref = llada_generate(model, prompt, A, steps, block, V - 1)
        ours = build_decoder({"name": "top_prob", "steps": steps, "window": block}).decode(
            model, build_order("random"), x, answer).tokens
        assert torch.equal(ref, ours), (steps, block)


def test_timed_forward_counts_rows(tiny_model):
    x, answer = _batch()
    order = build_order("random")
    f = TimedForward(tiny_model, order, order.layout(answer))
    masked = answer & (x == 8)
    assert f(x, masked).shape == (3, 16, 9) and f(x, masked, torch.tensor([0, 2])).shape == (2, 16, 9)
    assert (f.calls, f.row_passes) == (2, 5)


@pytest.mark.parametrize("steps,window", [(12, 4), (6, 6), (9, 5), (24, 12), (5, None)])
def test_commit_counts_follow_llada_even_split(tiny_model, steps, window):
    """The per-window plan (tensor arithmetic, no host loop) commits even_split(n, steps) per step."""
    x, answer = _batch(B=2, L=16)
    answer[1, 3] = False
    r = build_decoder({"name": "top_prob", "steps": steps, "window": window}).decode(
        tiny_model, build_order("random"), x, answer)
    for b in range(2):
        n = int(answer[b].sum())
        w = window or n
        n_win = -(-n // w)
        counts = torch.bincount(r.trace.finalize_step[b][answer[b]], minlength=steps).tolist()
        want = []
        for k in range(n_win):
            want += even_split(min(w, n - k * w), steps // n_win)
        assert counts == want + [0] * (len(counts) - len(want))


@pytest.mark.parametrize("V", [50, 1024, 1100, 4096 + 7])
def test_first_max_is_tensor_max(V):
    """The blocked first maximum gives Tensor.max's values and indices: ties (the first wins), a
    maximum in the partial last block, NaN (counts as the largest), rows of -inf."""
    torch.manual_seed(V)
    x = (torch.randn(9, V) * 5).round()  # rounded: many ties
    x[1] = float("-inf")
    x[2, V - 1] = 100.0
    x[3, 3] = x[3, V - 2] = 200.0
    x[4, V // 2] = float("nan")
    x[5] = float("-inf")
    x[5, V - 1] = 0.0
    ref = x.max(-1)
    top, idx = first_max(x)
    assert torch.equal(idx, ref.indices) and torch.allclose(top, ref.values, equal_nan=True)


class _HostReads(TorchFunctionMode):
    """Counts the calls that read a tensor's value on the host (a sync on a GPU)."""

    READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "equal")

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.n += getattr(func, "__name__", "") in self.READS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("spec", [{"name": "top_prob"}, {"name": "top_prob", "steps": 12, "window": 4},
                                  {"name": "threshold", "tau": 0.3}, {"name": "top_prob", "window": 4, "cache": "dual"}])
def test_two_host_reads_per_step(tiny_model, spec):
    """A greedy step reads the device twice: the loop's rows with holes left (whether to go on,
    which rows to forward) and the model's position check; a cached forward's query count is its
    one more. No other step-by-step read (nothing compares tokens, counts or tests a mask)."""
    x, answer = _batch()
    rec = _HostReads()
    with rec:
        r = build_decoder(dict(spec)).decode(tiny_model, build_order("random"), x, answer)
    steps = int(r.trace.nfe.max())
    # + the start's window count (2), the loop's last read (1), the event log's flushes (1 per 16 steps)
    assert rec.n <= (3 if spec.get("cache") else 2) * steps + 3 + (steps + 15) // 16, (rec.n, steps)
