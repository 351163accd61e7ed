"""The one backbone every order trains: a pre-norm transformer with RoPE and SDPA.

The order never lives in here. The network takes token ids (plus optional task-supplied
embedding ids, e.g. Sudoku row/column/box), explicit RoPE positions and a boolean
attention mask built by the order (``True`` = query may attend to key). The same weights
therefore serve bidirectional MDM decoding, causal AR decoding and the two-stream
``[x_t ⊕ x_0]`` training pass of block diffusion, where both halves reuse positions 0..L-1.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..checks import check_bool, check_choice, check_float, check_int, check_mapping
from .compiled import blocks_runner
from .linear import Linear, active_copies, products


@dataclass
class ModelConfig:
    vocab_size: int = 16          # including the mask token
    mask_id: int = 15
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp: str = "swiglu"           # "swiglu" | "gelu"
    mlp_ratio: float = 4.0
    max_len: int = 1024
    rope_base: float = 10000.0
    time_conditioning: bool = False
    # name -> table size of extra embeddings added to the token embedding (task supplied)
    extra_embeddings: Dict[str, int] = field(default_factory=dict)
    tie_embeddings: bool = False

    def __post_init__(self):
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "max_len"):
            setattr(self, key, check_int(f"model.{key}", getattr(self, key), 1))
        check_choice("model.mlp", self.mlp, ("swiglu", "gelu"))
        self.mlp_ratio = check_float("model.mlp_ratio", self.mlp_ratio, 0, lo_open=True)
        self.rope_base = check_float("model.rope_base", self.rope_base, 0, lo_open=True)
        for key in ("time_conditioning", "tie_embeddings"):
            check_bool(f"model.{key}", getattr(self, key))
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2 != 0:
            raise ValueError(f"model.d_model / model.n_heads must be even for RoPE, got {self.d_model} / {self.n_heads} "
                             f"= {self.d_model // self.n_heads}")
        hidden = int(self.mlp_ratio * self.d_model)
        if (int(2 * hidden / 3) if self.mlp == "swiglu" else hidden) < 1:  # the MLP's width (see MLP)
            raise ValueError(f"model.mlp_ratio={self.mlp_ratio} x model.d_model={self.d_model} leaves the MLP "
                             f"without a hidden unit; make it larger")
        if not 0 <= check_int("model.mask_id", self.mask_id) < self.vocab_size:
            raise ValueError(f"model.mask_id {self.mask_id} outside vocabulary of size {self.vocab_size}")
        for name, size in check_mapping("model.extra_embeddings", self.extra_embeddings).items():
            check_int(f"model.extra_embeddings.{name}", size, 1)

    def to_dict(self):
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        weight = self.weight
        if x.is_cpu and x.dtype == torch.float32 and weight.dtype == torch.float32:
            # PyTorch's fused CPU kernel: in float32 the same bits as the lines below, values and
            # gradients (tests/test_cached_pass.py), in one op instead of six (CUDA's fused
            # kernel sums in another order: there the lines below stay)
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * weight


def rope_tables(positions: torch.Tensor, head_dim: int, base: float):
    """cos/sin tables [..., L, hd] for integer positions of shape [B, L] (or [L]), laid out for
    :func:`apply_rope`: ``cos`` repeated over both halves, ``sin`` negated on the first half."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    ang = positions.float().unsqueeze(-1) * inv  # [..., L, hd/2]
    cos, sin = ang.cos(), ang.sin()
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the (first half, second half) pairs of ``x`` [..., L, hd] by the tables of
    :func:`rope_tables` (broadcast over the leading dims: queries and keys rotate in one go):
    ``[x1 cos - x2 sin, x2 cos + x1 sin]`` as ``x * cos + [x2, x1] * [-sin, sin]``, the same bits
    (negation and the order of a two-term sum are exact) in four element-wise ops instead of
    seven per tensor."""
    swapped = x.roll(x.shape[-1] // 2, -1)  # [x2, x1]: the same values as a cat of the halves, one dispatch
    if cos.dtype != x.dtype:  # (a no-op .to still costs a dispatch: a decode step runs this per layer)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + swapped * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, attn_mask):
        return self.proj(self.mix(x, cos, sin, attn_mask))

    def mix(self, x, cos, sin, attn_mask):
        """The heads' attention outputs [B, L, D], before the output projection."""
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(qkv[:2], cos, sin)
        y = F.scaled_dot_product_attention(q, k, qkv[2], attn_mask=attn_mask)
        return y.transpose(1, 2).reshape(B, L, D)

    def forward_cached(self, x, cos, sin, kv_buf, idx, attn_mask, mul, w_qkv, w_proj):
        """Queries ``x`` [B, Q, D] only: write their post-RoPE K and V into the per-position buffer
        ``kv_buf`` [2, B, H, L + 1, hd] (K, then V) at ``idx`` [2 * B * H * Q] (their rows in the
        buffer seen as [2 * B * H * (L + 1), hd]: one row copy per head, query and K/V, much
        cheaper than a scatter), then attend over the buffer under ``attn_mask`` [B, 1, Q, L + 1]
        (keys of cached positions were written when they froze); ``attn_mask=None``: every query
        sees slots 0..L-1 (no mask for SDPA to build, read or add), never the scratch slot L.
        ``mul(x, w)`` multiplies by ``w_qkv`` and ``w_proj``: the layers' own product or their
        copies' (:meth:`Block.cached_weights`)."""
        B, Q, D = x.shape
        hd = D // self.n_heads
        qkv = mul(x, w_qkv).view(B, Q, 3, self.n_heads, hd).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(qkv[:2], cos, sin)
        kv = torch.stack([k, qkv[2]]).reshape(-1, hd)
        kv_buf.view(-1, hd).index_copy_(0, idx, kv if kv.dtype == kv_buf.dtype else kv.to(kv_buf.dtype))
        # attn_mask None: slots 0..L-1 only (one slice of the buffer, not one of K and one of V)
        k_buf, v_buf = (kv_buf if attn_mask is not None else kv_buf[:, :, :, :-1]).unbind(0)
        # casts only where dtypes differ (a no-op .to still costs a dispatch, per layer and step)
        y = F.scaled_dot_product_attention(q if q.dtype == k_buf.dtype else q.to(k_buf.dtype), k_buf, v_buf,
                                           attn_mask=attn_mask)
        y = y if y.dtype == x.dtype else y.to(x.dtype)
        return mul(y.transpose(1, 2).reshape(B, Q, D), w_proj)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.d_model)
        self.kind = cfg.mlp
        if cfg.mlp == "swiglu":
            hidden = int(2 * hidden / 3)  # keep the parameter count of a 4x GELU MLP
            self.gate = Linear(cfg.d_model, hidden, bias=False)
        self.up = Linear(cfg.d_model, hidden, bias=False)
        self.down = Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x):
        if self.kind == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(cfg.d_model), RMSNorm(cfg.d_model)
        self.attn, self.mlp = Attention(cfg), MLP(cfg)

    def forward(self, x, cos, sin, attn_mask, rows=None):
        """[B, L, D]; with ``rows`` [B, L] bool, the outputs [N, D] of its True rows only: every
        row's keys and values take part in attention, but the output projection, the residual and
        the MLP act row by row, so they run on the N rows asked for (row by row the arithmetic of
        the full block). One entry point, so that wrappers hooking the call (FSDP) see both."""
        if rows is None:
            x = x + self.attn(self.norm1(x), cos, sin, attn_mask)
            return x + self.mlp(self.norm2(x))
        a = self.attn.mix(self.norm1(x), cos, sin, attn_mask)
        x = x[rows]
        n = len(x)
        x = pad_rows(x) + self.attn.proj(pad_rows(a[rows]))  # CPU autocast: a few shapes (ROW_MULTIPLE)
        return (x + self.mlp(self.norm2(x)))[:n]

    def forward_cached(self, x, cos, sin, kv_buf, idx, attn_mask, weights):
        """:meth:`forward` of the cached queries (:meth:`Attention.forward_cached`), calling no
        module: ``weights`` from :meth:`cached_weights`, the norms' ``forward`` directly. At a
        window pass's few rows the module calls cost a tenth of the pass; the ops are the same."""
        mul, (qkv, proj, gate, up, down) = weights
        x = x + self.attn.forward_cached(self.norm1.forward(x), cos, sin, kv_buf, idx, attn_mask, mul, qkv, proj)
        h = self.norm2.forward(x)
        return x + mul(F.silu(mul(h, gate)) * mul(h, up) if gate is not None else F.gelu(mul(h, up)), down)

    def cached_weights(self, copies):
        """``(mul, (qkv, proj, gate, up, down))`` for :meth:`forward_cached` (``gate`` None for
        the GELU MLP): ``model/linear.py``'s :func:`products` of the block's layers, kept in
        ``copies`` (the dict of :func:`active_copies`, None: the layers' own weights, read now)."""
        got = None if copies is None else copies.get(self)
        if got is None:
            layers = (self.attn.qkv, self.attn.proj, getattr(self.mlp, "gate", None), self.mlp.up, self.mlp.down)
            got = products(layers, copies)
            if copies is not None:
                copies[self] = got
        return got


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t -> a vector added to every position (off by default)."""

    def __init__(self, d: int):
        super().__init__()
        self.d = d
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, t):  # t: [B]
        half = self.d // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        ang = t.float().unsqueeze(-1) * 1000.0 * freqs
        return self.mlp(torch.cat([ang.cos(), ang.sin()], dim=-1))


# Under CPU autocast (bf16 matmuls through oneDNN, which builds a kernel per matrix shape), the
# row-wise training work (Block.forward with rows, objectives/rows.py) runs on a row count rounded up
# to a multiple of this with zero rows: the scored rows number differently every step, and new
# shapes every step made a bf16 step here 1.25x slower than seen ones. fp32 (MKL) and GPUs build
# no kernel per shape, so there the rows run as they are (padding would only add work).
ROW_MULTIPLE = 64


def pad_rows(t: torch.Tensor, multiple: Optional[int] = None) -> torch.Tensor:
    """``t`` [N, ...] with zero rows appended up to a multiple of ``multiple`` rows (default:
    :data:`ROW_MULTIPLE` under CPU autocast, else none)."""
    if multiple is None:
        multiple = ROW_MULTIPLE if t.device.type == "cpu" and torch.is_autocast_enabled("cpu") else 1
    extra = -len(t) % multiple
    return torch.cat([t, t.new_zeros((extra,) + t.shape[1:])]) if extra else t


def check_positions(largest: int, max_len: int) -> None:
    if largest >= max_len:
        raise ValueError(f"position {largest} exceeds model.max_len={max_len}")


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.extra = nn.ModuleDict({k: nn.Embedding(n, cfg.d_model) for k, n in cfg.extra_embeddings.items()})
        self.time = TimeEmbedding(cfg.d_model) if cfg.time_conditioning else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.recompute = False  # set_gradient_checkpointing
        self.norm = RMSNorm(cfg.d_model)
        self.head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok.weight
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2 style scaled init of residual projections
            if name.endswith("proj.weight") or name.endswith("down.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def hidden(self, tokens, attn_mask=None, positions=None, extra=None, t=None):
        """Final hidden states [B, L, D] (before the output head)."""
        return self.hidden_rows(tokens, None, attn_mask, positions, extra, t)

    def hidden_rows(self, tokens, rows, attn_mask=None, positions=None, extra=None, t=None):
        """Final hidden states [N, D] of the True rows of ``rows`` [B, L] (row-major), or of every
        row as [B, L, D] when ``rows`` is None. A training loss reads only its scored rows: the
        last block's attention still runs over every row (they are its keys), its position-wise
        rest on the scored rows only (objectives/rows.py)."""
        B, L = tokens.shape
        if positions is None:  # 0..L-1: checked without reading the device
            check_positions(L - 1, self.cfg.max_len)
            positions = torch.arange(L, device=tokens.device)
        else:
            check_positions(int(positions.max()), self.cfg.max_len)
        if positions.dim() == 1:
            positions = positions.unsqueeze(0).expand(B, L)
        h = self._embed(tokens, positions, extra, t)
        cos, sin = self.rope_at(positions)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)  # [B, 1, Lq, Lk] broadcasts over heads
        recompute = self.recompute and torch.is_grad_enabled()  # train.gradient_checkpointing
        for i, blk in enumerate(self.blocks):
            args = (h, cos, sin, attn_mask) + ((rows,) if rows is not None and i == len(self.blocks) - 1 else ())
            h = checkpoint(blk, *args, use_reentrant=False) if recompute else blk(*args)
        return self.norm(h)

    def rope_at(self, positions: torch.Tensor):
        """RoPE tables [B, 1, L, hd] at [B, L] positions (checked against ``max_len`` by the
        caller), read from tables of every position made once per device: the same bits as
        :func:`rope_tables` of the positions themselves (tests/test_cached_pass.py), without
        the trigonometry of every pass."""
        table = self.__dict__.get("_rope_table")
        if table is None or table[0].device != positions.device:
            table = rope_tables(torch.arange(self.cfg.max_len, device=positions.device),
                                self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_base)
            self.__dict__["_rope_table"] = table  # not a buffer: never saved, made again on a new device
        return table[0][positions].unsqueeze(1), table[1][positions].unsqueeze(1)

    def set_gradient_checkpointing(self, on: bool = True) -> None:
        """Recompute each block's activations in the backward pass (train/recompute.py)."""
        self.recompute = bool(on)

    def _embed(self, tokens, positions, extra=None, t=None):
        """Token + task embeddings (+ time) of [B, L] ids at [B, L] positions (checked by the caller)."""
        B, L = tokens.shape
        h = self.tok(tokens)
        for name, ids in (extra or {}).items():
            if name not in self.extra:
                raise ValueError(f"extra embedding {name!r} not in model.extra_embeddings {list(self.extra)}")
            ids = ids if ids.dim() == 2 else ids.unsqueeze(0).expand(B, L)
            h = h + self.extra[name](ids)
        if self.time is not None:
            if t is None:
                raise ValueError("model.time_conditioning is on: pass t")
            h = h + self.time(t).unsqueeze(1)
        return h

    def forward(self, tokens, attn_mask=None, positions=None, extra=None, t=None):
        """Logits [B, L, V]; the mask token can never be predicted (MDLM's zero-masking)."""
        return self.head_logits(self.hidden(tokens, attn_mask, positions, extra, t))

    def head_logits(self, h):
        """fp32 logits [..., V] of final hidden states ``h`` [..., D] (the output head, mask token
        at -inf). Training applies it to the scored rows only (objectives/rows.py); row by row it
        gives the bits :meth:`forward` gives."""
        logits = self.head(h).float()
        logits[..., self.cfg.mask_id] = float("-inf")
        return logits

    def logits_at(self, tokens, where, attn_mask=None, positions=None, extra=None, t=None):
        """Logits [N, V] at the True positions of ``where`` [B, L] (row-major): every position runs
        through the blocks, the output head only where asked (a decoder reads only the positions
        it may commit now; at a large vocabulary the head is most of a pass)."""
        logits = self.head(self.hidden(tokens, attn_mask, positions, extra, t)[where]).float()
        logits[..., self.cfg.mask_id] = float("-inf")
        return logits

    def forward_cached(self, tokens, positions, cache, slots, attn_mask, extra=None, t=None):
        """Logits [B, Q, V] of the query tokens [B, Q] only: :meth:`head_logits` of
        :meth:`hidden_cached`."""
        return self.head_logits(self.hidden_cached(tokens, positions, cache, slots, attn_mask, extra, t))

    def hidden_cached(self, tokens, positions, cache, slots, attn_mask, extra=None, t=None):
        """Final hidden states [B, Q, D] of the query tokens [B, Q] only (model/kv_cache.py); a
        decoder applies the output head where it reads (decoding/forward.py).

        ``positions`` [B, Q]: their true sequence positions (RoPE); ``slots`` [B, Q]: where their
        K/V go in ``cache`` (the position, or the cache's scratch slot for padding queries);
        ``attn_mask`` [B, Q, L'] bool over the cache's slots, or None when every query is real
        and sees every slot but the scratch one (:attr:`cached_mask_optional`). Same maths as
        :meth:`forward` for these rows, given that the cache holds the K/V every visible key
        would get in a full pass. Positions index the cache, so checking its length against
        ``max_len`` checks them without a read of the device per step.
        """
        check_positions(cache.length - 1, self.cfg.max_len)
        h = self._embed(tokens, positions, extra, t)
        cos, sin = self.rope_at(positions)
        mask = None if attn_mask is None else attn_mask.unsqueeze(1)
        _, B, H, S = cache.kv[0].shape[:4]
        # each query's K and V rows in every layer's buffer seen as [2 * B * H * S, hd]: once,
        # not per layer
        heads = torch.arange(2 * B * H, device=slots.device).view(2, B, H, 1) * S
        idx = (heads + slots.view(1, B, 1, -1)).flatten()
        copies = active_copies()
        weights = [blk.cached_weights(copies) for blk in self.blocks]
        return blocks_runner(self)(h, cos, sin, cache.kv, idx, mask, weights)

    def blocks_cached(self, h, cos, sin, kv, idx, mask, weights):
        """The blocks and the final norm of :meth:`hidden_cached`: tensors in, tensors out (what
        ``decoder.compile`` compiles: model/compiled.py)."""
        for blk, kv_buf, w in zip(self.blocks, kv, weights):
            h = blk.forward_cached(h, cos, sin, kv_buf, idx, mask, w)
        return self.norm(h)

    # forward_cached takes attn_mask=None for "all slots but the scratch one" (decoding/forward.py)
    cached_mask_optional = True

    def shard_units(self):
        """The modules FSDP shards one by one (train/fsdp.py): the transformer blocks."""
        return list(self.blocks)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok.weight.numel()
        return n
