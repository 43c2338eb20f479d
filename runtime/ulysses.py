"""Ulysses-style sequence-parallel attention over a packed variable-length batch, with the SP group chosen per
call (per micro-batch) rather than fixed at model construction.

Layout. An SP group of degree d runs a packed batch: its sequences concatenated into T tokens with boundaries
``cu_seqlens`` = [0, s_1, s_1 + s_2, ..., T]. The T tokens are sharded contiguously over the group's ranks in
group-rank order; :func:`shard_sizes` gives each rank's token count (uneven when d does not divide T; a rank may
hold 0 tokens). Each rank holds q, k, v of its shard, shape [T_i, H, D] (tokens, heads, head dim).

Forward: one all-to-all scatters heads and gathers the sequence (every rank ends with all T tokens for H/d
heads; a degree that does not divide H splits the heads unevenly, see :func:`head_range`), attention runs over
whole sequences (causal and block-diagonal: token t of a sequence sees tokens 0..t of the same sequence only), one
all-to-all sends the result back to the token owners. The all-to-all is
an autograd.Function whose backward is the inverse all-to-all, so gradients reach q, k, v on the rank that
owns each token. Degree 1 (group None or of size 1) is plain local attention.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["shard_sizes", "shard_range", "packed_causal_attention", "reference_packed_attention",
           "ulysses_attention", "all_to_all_tokens", "head_range"]


def shard_sizes(total_tokens: int, degree: int) -> list[int]:
    """Token count of each of ``degree`` contiguous shards of ``total_tokens`` (first shards take the rest)."""
    if degree < 1:
        raise ValueError(f"degree: {degree} must be >= 1")
    if total_tokens < 0:
        raise ValueError(f"total_tokens: {total_tokens} must be >= 0")
    q, r = divmod(total_tokens, degree)
    return [q + (1 if i < r else 0) for i in range(degree)]


def shard_range(total_tokens: int, degree: int, index: int) -> tuple[int, int]:
    """[start, stop) token range of shard ``index``."""
    sizes = shard_sizes(total_tokens, degree)
    if not 0 <= index < degree:  # (-1 returned the last shard, degree an IndexError)
        raise ValueError(f"shard index {index} is not in [0, degree {degree})")
    start = sum(sizes[:index])
    return start, start + sizes[index]


def _as_bounds(cu_seqlens: Sequence[int] | Tensor) -> list[int]:
    if isinstance(cu_seqlens, Tensor) and cu_seqlens.dim() != 1:
        raise ValueError(f"cu_seqlens: a {cu_seqlens.dim()}-D tensor; must be 1-D boundaries")
    raw = cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else list(cu_seqlens)
    if any(isinstance(x, bool) or not float(x).is_integer() for x in raw):  # (2.5 was read as 2)
        raise ValueError(f"cu_seqlens: {raw[:8]}... must be whole token counts")
    b = [int(x) for x in raw]
    if len(b) < 1 or b[0] != 0 or any(b1 < b0 for b0, b1 in zip(b, b[1:])):
        raise ValueError(f"cu_seqlens: {b[:8]}... must start at 0 and be non-decreasing")
    return b


def packed_causal_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Sequence[int] | Tensor) -> Tensor:
    """Causal attention over each packed sequence separately. q, k, v: [T, h, D]; returns [T, h, D].

    One scaled-dot-product call per sequence (no T x T mask), scale 1/sqrt(D)."""
    bounds = _as_bounds(cu_seqlens)
    if bounds[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens ends at {bounds[-1]} but q has {q.shape[0]} tokens")
    outs = []
    for a, b in zip(bounds, bounds[1:]):
        if b == a:
            continue
        # [s, h, D] -> [h, s, D]
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        outs.append(o.transpose(0, 1))
    if not outs:  # no tokens: an empty result still in q's graph (new_zeros was not: see ulysses_attention)
        return q * 0
    return torch.cat(outs, dim=0)


def reference_packed_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Sequence[int] | Tensor) -> Tensor:
    """Plain-math reference of :func:`packed_causal_attention`: one T x T score matrix per head with a
    block-diagonal causal mask, softmax, weighted sum. For tests (O(T^2) memory)."""
    bounds = _as_bounds(cu_seqlens)
    T = q.shape[0]
    if bounds[-1] != T:  # (trailing tokens got uninitialised sequence ids: a garbage mask)
        raise ValueError(f"cu_seqlens ends at {bounds[-1]} but q has {T} tokens")
    seq_of = torch.empty(T, dtype=torch.long)
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        seq_of[a:b] = i
    pos = torch.arange(T)
    allowed = (seq_of[:, None] == seq_of[None, :]) & (pos[None, :] <= pos[:, None])
    scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed.to(q.device), float("-inf"))
    return torch.einsum("hts,shd->thd", torch.softmax(scores, dim=-1), v)


class _AllToAllTokens(torch.autograd.Function):
    """all_to_all_single along dim 0 with explicit (possibly uneven) split sizes; backward is the inverse
    exchange (send and receive splits swapped)."""

    @staticmethod
    def forward(ctx, x: Tensor, group, in_splits: list[int], out_splits: list[int]) -> Tensor:
        ctx.group, ctx.in_splits, ctx.out_splits = group, in_splits, out_splits
        return _exchange(x, group, in_splits, out_splits)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _exchange(grad, ctx.group, ctx.out_splits, ctx.in_splits), None, None, None


def _exchange(x: Tensor, group, in_splits: list[int], out_splits: list[int]) -> Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group)
    return out


def all_to_all_tokens(x: Tensor, group, in_splits: list[int], out_splits: list[int]) -> Tensor:
    """Differentiable all-to-all along dim 0: rows [sum(in_splits[:j]), +in_splits[j]) go to group rank j;
    the result concatenates what each group rank sent, in group-rank order."""
    return _AllToAllTokens.apply(x, group, list(in_splits), list(out_splits))


def _group_degree_rank(group) -> tuple[int, int]:
    if group is None:
        return 1, 0
    grank = dist.get_rank(group)
    if grank < 0:  # (read as "degree: -1 must be >= 1")
        raise ValueError(f"group: rank {dist.get_rank()} is not a member of this SP group (only its members call "
                         f"ulysses_attention with it)")
    return dist.get_world_size(group), grank


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Sequence[int] | Tensor, group=None, *,
                      attn_fn: Callable[[Tensor, Tensor, Tensor, Sequence[int]], Tensor] = packed_causal_attention
                      ) -> Tensor:
    """Sequence-parallel attention of this rank's shard.

    q, k, v: [T_i, H, D], this rank's contiguous shard (:func:`shard_range`) of the group's packed batch;
    cu_seqlens: boundaries of the whole packed batch (length n_seq + 1, ends at T = sum of shards); group:
    the SP process group of this micro-batch (None or size 1: local attention). Group rank j attends over
    heads :func:`head_range` (H/d each when d divides H; otherwise the first H mod d ranks take one more, and
    with d > H the last ranks take none - their attention is idle, the exchanges still run). attn_fn(q, k, v,
    cu_seqlens) computes attention on full sequences ([T, heads of this rank, D]). Returns [T_i, H, D].
    """
    bounds = _as_bounds(cu_seqlens)
    degree, grank = _group_degree_rank(group)
    T = bounds[-1]
    sizes = shard_sizes(T, degree)
    Ti, H, D = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if Ti != sizes[grank]:
        raise ValueError(f"q has {Ti} tokens but shard {grank} of {T} tokens over degree {degree} has {sizes[grank]}")
    if degree == 1:
        return attn_fn(q, k, v, bounds)
    if H % degree == 0:
        hl = H // degree
        # [T_i, 3, H, D] -> [d, T_i, 3, H/d, D]: the chunk for group rank j holds heads [j*H/d, (j+1)*H/d)
        qkv = torch.stack((q, k, v), dim=1).view(Ti, 3, degree, hl, D).permute(2, 0, 1, 3, 4)
        qkv = qkv.reshape(degree * Ti, 3, hl, D)
        full = all_to_all_tokens(qkv, group, [Ti] * degree, sizes)  # [T, 3, H/d, D], tokens in sequence order
        out = _in_graph(attn_fn(full[:, 0], full[:, 1], full[:, 2], bounds), full)  # [T, H/d, D]
        back = all_to_all_tokens(out, group, sizes, [Ti] * degree)  # [d * T_i, H/d, D], chunk j = heads of rank j
        return back.view(degree, Ti, hl, D).permute(1, 0, 2, 3).reshape(Ti, H, D)
    # Uneven heads: group rank j gets the contiguous head range head_range(H, degree, j) (first ranks take the
    # rest; with degree > H the last ranks get none). The chunks differ in shape, so they travel flattened
    # with element split sizes.
    hs = shard_sizes(H, degree)
    hl = hs[grank]
    qkv = torch.stack((q, k, v), dim=1)  # [T_i, 3, H, D]
    send = torch.cat([qkv[:, :, slice(*head_range(H, degree, j))].reshape(-1) for j in range(degree)])
    full = all_to_all_tokens(send, group, [Ti * 3 * n * D for n in hs], [t * 3 * hl * D for t in sizes])
    full = full.view(T, 3, hl, D)
    # a rank without heads keeps `out` an (empty) view of `full`, so its backward still joins the exchange
    out = _in_graph(attn_fn(full[:, 0], full[:, 1], full[:, 2], bounds), full) if hl else full[:, 0]  # [T, hl, D]
    back = all_to_all_tokens(out.reshape(-1), group, [t * hl * D for t in sizes], [Ti * n * D for n in hs])
    return torch.cat([c.view(Ti, n, D) for c, n in zip(back.split([Ti * n * D for n in hs]), hs)], dim=1)


def _in_graph(out: Tensor, full: Tensor) -> Tensor:
    """``out`` joined to ``full``'s graph when the attention left it out (an empty batch, an attn_fn returning a
    constant): every group rank must run the backward exchanges, or those that do wait for those that do not until
    the collective timeout (degree > heads: the ranks without heads always run them)."""
    if full.requires_grad and not out.requires_grad:
        return out + 0 * full[:, 0]
    return out


def head_range(heads: int, degree: int, index: int) -> tuple[int, int]:
    """[start, stop) of the heads group rank ``index`` attends over in a group of ``degree`` (contiguous ranges,
    first ranks take the rest; empty for the last ranks when degree > heads)."""
    return shard_range(heads, degree, index)
