"""A tiny MoE language model and a synthetic language-modelling task (for train_moe and the schedule bench).

TinyMoELM: token + position embeddings, ``L`` pre-norm blocks (causal self-attention, then an
:class:`MoELayer` FFN whose router config may differ per layer, e.g. from a capacity schedule), final norm,
tied LM head. ``aux_loss()`` sums the layers' router losses; ``layer_stats()`` lists their statistics.

Synthetic task (:class:`MarkovTask`): sequences from a fixed random order-2 Markov chain over ``vocab``
tokens: every context (previous two tokens) has ``branching`` successors with probabilities
``0.6, 0.3, 0.1, ...`` (renormalised), so the achievable loss is known: the chain's conditional entropy
(``MarkovTask.entropy_nats``) at every position but the first, whose target follows one uniformly drawn token and
costs ln(vocab) - over ``S`` positions ``MarkovTask.floor_nats(S)`` = (ln V + (S - 1) H) / S.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from .ep import ExpertParallel, GradSliceReducer
from .layer import MoELayer, split_parameters
from .router import RouterConfig

__all__ = ["TinyMoELM", "MarkovTask"]


class MarkovTask:
    """Order-2 Markov chain language; ``batch(gen, B, S)`` -> (inputs, targets) int64 (B, S)."""

    def __init__(self, vocab: int = 32, branching: int = 3, seed: int = 1234):
        if vocab < 2 or branching < 1 or branching > vocab:
            raise ValueError(f"vocab={vocab}, branching={branching}: need vocab >= 2 and 1 <= branching <= vocab")
        g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.succ = torch.stack([torch.randperm(vocab, generator=g)[:branching] for _ in range(vocab * vocab)])
        base = torch.tensor([0.6, 0.3, 0.1] + [0.05] * max(0, branching - 3))[:branching]
        self.probs = base / base.sum()
        self.entropy_nats = float(-(self.probs * self.probs.log()).sum())

    def floor_nats(self, S: int) -> float:
        """The lowest mean loss over ``S`` target positions: the first target (the second of two uniformly drawn
        tokens) costs ln(vocab) whatever the model does, the other S - 1 the chain's entropy (``entropy_nats``
        alone was reported as the floor: 0.898 where 0.976 is reachable at vocab 16, S = 24)."""
        return (math.log(self.vocab) + (S - 1) * self.entropy_nats) / S

    def batch(self, gen: torch.Generator, B: int, S: int):
        seq = torch.empty(B, S + 1, dtype=torch.int64)
        seq[:, :2] = torch.randint(0, self.vocab, (B, 2), generator=gen)
        for t in range(2, S + 1):
            ctx = seq[:, t - 2] * self.vocab + seq[:, t - 1]
            pick = torch.multinomial(self.probs.expand(B, -1), 1, generator=gen).squeeze(1)
            seq[:, t] = self.succ[ctx, pick]
        return seq[:, :-1], seq[:, 1:]


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, router: RouterConfig, **moe_kw):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.moe = MoELayer(d, ffn, router, **moe_kw)

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, S, D))
        return x + self.moe(self.ln2(x))


def _ep_for(ep: ExpertParallel | None, num_experts: int) -> ExpertParallel | None:
    """The same groups with this layer's expert count (layers may differ under an expert-count schedule)."""
    if ep is None or ep.num_experts == num_experts:
        return ep
    if num_experts % ep.size:
        raise ValueError(f"num_experts: {num_experts} is not divisible by the expert-parallel size {ep.size}")
    return replace(ep, num_experts=num_experts)


class TinyMoELM(nn.Module):
    """``routers``: one RouterConfig per layer. ``ep``/``r_fwd``/``r_bwd``/``wgrad``/``order_fwd``/``order_bwd``/
    ``reducer``/``backend``/``shared_experts`` go to every MoE layer (the pipeline settings may be per-layer
    lists)."""

    def __init__(self, vocab: int, d: int, heads: int, ffn: int, routers: list[RouterConfig], max_len: int = 256,
                 *, ep: ExpertParallel | None = None, r_fwd=1, r_bwd=1, wgrad="fused", order_fwd="dispatch-first",
                 order_bwd="dispatch-first", reducer: GradSliceReducer | None = None, shared_experts: int = 0,
                 backend: str = "torch", activation: str = "swiglu"):
        super().__init__()
        if d % heads:
            raise ValueError(f"d={d} is not divisible by heads={heads}")
        L = len(routers)
        def per_layer(v):
            if isinstance(v, (list, tuple)):
                if len(v) != L:
                    raise ValueError(f"a per-layer pipeline setting has {len(v)} entries for {L} MoE layers: {v!r}")
                return list(v)
            return [v] * L

        rf, rb, wg, of, ob = (per_layer(v) for v in (r_fwd, r_bwd, wgrad, order_fwd, order_bwd))
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(_Block(d, heads, ffn, cfg, ep=_ep_for(ep, cfg.num_experts), r_fwd=rf[i], r_bwd=rb[i], wgrad=wg[i],
                                           order_fwd=of[i], order_bwd=ob[i], reducer=reducer,
                                           shared_experts=shared_experts,
                                           backend=backend, activation=activation)
                                    for i, cfg in enumerate(routers))
        self.ln = nn.LayerNorm(d)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def init_experts(self, seed: int) -> None:
        """Deterministic full expert weights (identical for any EP size or expert sharding), each rank keeping its
        shard."""
        g = torch.Generator().manual_seed(seed)
        for blk in self.blocks:
            m = blk.moe
            E = m.router.config.num_experts
            cols = 2 * m.ffn if m.activation == "swiglu" else m.ffn     # full widths: any EP size / shards
            w1 = torch.randn(E, m.hidden, cols, generator=g) * m.hidden ** -0.5
            w2 = torch.randn(E, m.ffn, m.hidden, generator=g) * m.ffn ** -0.5
            m.load_full_experts(w1, w2)

    def moe_layers(self) -> list[MoELayer]:
        return [b.moe for b in self.blocks]

    def dense_parameters(self) -> list[nn.Parameter]:
        """Replicated parameters (everything except the expert-parallel experts' w1/w2), forward order."""
        return split_parameters(self)[0]

    def expert_parameters(self) -> list[nn.Parameter]:
        """The expert-parallel layers' expert shards (w1/w2), forward order; empty without EP."""
        return split_parameters(self)[1]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        S = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(S, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.ln(x) @ self.tok.weight.t()

    def aux_loss(self) -> torch.Tensor:
        return sum((m.aux_loss for m in self.moe_layers()), torch.zeros(()))

    def layer_stats(self) -> list[dict]:
        return [m.last_stats.as_dict() for m in self.moe_layers() if m.last_stats is not None]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def uniform_loss(vocab: int) -> float:
    return math.log(vocab)
