"""A tiny GPT whose attention is Ulysses SP on the group chosen per micro-batch, plus packing helpers.

The model never holds a process group: every forward takes this rank's token shard, the packed batch's
boundaries and the micro-batch's SP group (None = degree 1). Everything except attention is per token, so it
runs on the shard as is; attention exchanges heads and tokens inside the group (see runtime/ulysses.py).

Loss convention: next-token prediction inside each sequence (the last token of a sequence has no target). A
rank's loss is the SUM of its tokens' cross-entropies divided by the global batch's target count, so summing
losses and gradients over all ranks and micro-batches gives the mean loss over every target token of the
global batch and its exact gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import sp_model_spec as spec
from .ulysses import packed_causal_attention, ulysses_attention

__all__ = ["TinyGPTConfig", "TinyGPT", "PackedBatch", "pack_sequences", "IGNORE"]

IGNORE = -100  # target of a sequence's last token


@dataclass(frozen=True, kw_only=True)
class TinyGPTConfig:
    vocab: int = spec.VOCAB
    """token ids in [0, vocab)"""
    hidden: int = spec.HIDDEN
    """model width; hidden = heads * head_dim"""
    heads: int = spec.HEADS
    """attention heads (an SP degree that does not divide them splits them unevenly, see ulysses.head_range)"""
    layers: int = spec.LAYERS
    max_len: int = spec.MAX_LEN
    """learned positions: longest sequence (tokens)"""
    mlp_ratio: int = spec.MLP_RATIO

    def __post_init__(self) -> None:
        for name in ("vocab", "hidden", "heads", "layers", "max_len", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"TinyGPTConfig.{name}: {getattr(self, name)} must be >= 1")
        if self.hidden % self.heads:
            raise ValueError(f"TinyGPTConfig.hidden: {self.hidden} is not divisible by heads={self.heads}")

    @property
    def params(self) -> int:
        """Parameter count of the model (``sp_model_spec.param_count``, torch-free)."""
        return spec.param_count(self.hidden, self.layers, self.max_len, self.vocab, self.mlp_ratio)


@dataclass
class PackedBatch:
    """Sequences concatenated: tokens, positions (restart at 0 per sequence) and targets, all [T]; cu_seqlens
    [n + 1] boundaries."""

    tokens: Tensor
    positions: Tensor
    targets: Tensor
    cu_seqlens: list[int]

    @property
    def num_tokens(self) -> int:
        return self.cu_seqlens[-1]

    def shard(self, start: int, stop: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.tokens[start:stop], self.positions[start:stop], self.targets[start:stop]


def pack_sequences(seqs: Sequence[Tensor]) -> PackedBatch:
    """Pack 1-D LongTensors of token ids; targets are the next token of the same sequence, IGNORE at the end."""
    cu = [0]
    toks, pos, tgt = [], [], []
    for s in seqs:
        n = int(s.numel())
        cu.append(cu[-1] + n)
        toks.append(s)
        pos.append(torch.arange(n, device=s.device))
        t = torch.full((n,), IGNORE, dtype=torch.long, device=s.device)
        t[:-1] = s[1:]
        tgt.append(t)
    if not seqs:
        empty = torch.zeros(0, dtype=torch.long)
        return PackedBatch(empty, empty, empty, cu)
    return PackedBatch(torch.cat(toks), torch.cat(pos), torch.cat(tgt), cu)


class _Block(nn.Module):
    def __init__(self, cfg: TinyGPTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(cfg.hidden)
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.ln2 = nn.LayerNorm(cfg.hidden)
        self.mlp = nn.Sequential(nn.Linear(cfg.hidden, cfg.mlp_ratio * cfg.hidden), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * cfg.hidden, cfg.hidden))

    def forward(self, x: Tensor, cu_seqlens: list[int], group) -> Tensor:
        T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(T, 3, self.heads, C // self.heads).unbind(1)
        a = ulysses_attention(q, k, v, cu_seqlens, group, attn_fn=packed_causal_attention)
        x = x + self.proj(a.reshape(T, C))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, cfg: TinyGPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.hidden)
        self.pos = nn.Embedding(cfg.max_len, cfg.hidden)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)

    def forward(self, tokens: Tensor, positions: Tensor, cu_seqlens: list[int], group=None) -> Tensor:
        """Logits [T_i, vocab] of this rank's shard (tokens, positions: [T_i]) of the packed batch with
        boundaries ``cu_seqlens``, attention on ``group`` (None: the whole batch is local)."""
        if positions.shape != tokens.shape:  # (one position was broadcast over every token: wrong logits)
            raise ValueError(f"positions {tuple(positions.shape)} and tokens {tuple(tokens.shape)} differ in shape")
        if positions.numel() and int(positions.max()) >= self.cfg.max_len:
            raise ValueError(f"position {int(positions.max())} >= max_len {self.cfg.max_len}")
        if positions.numel() and int(positions.min()) < 0:  # (an IndexError from nn.Embedding)
            raise ValueError(f"position {int(positions.min())} is negative")
        x = self.tok(tokens) + self.pos(positions)
        for blk in self.blocks:
            x = blk(x, cu_seqlens, group)
        return self.head(self.ln_f(x))

    def shard_loss(self, tokens: Tensor, positions: Tensor, targets: Tensor, cu_seqlens: list[int], group,
                   total_targets: int) -> Tensor:
        """Sum of this shard's next-token cross-entropies / total_targets (the global batch's target count)."""
        logits = self(tokens, positions, cu_seqlens, group)
        # half-precision logits go up to float32 for the softmax; float64 stays float64 (``.float()`` here cut a
        # float64 run's loss and logit gradients to float32, and --check-reference failed at its 1e-10 tolerance)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum") / total_targets
