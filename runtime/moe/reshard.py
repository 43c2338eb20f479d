"""Resharding MoE expert weights between expert-parallel layouts, for a checkpoint resume on another layout.

A save made with ``ep_size`` x ``expert_shards`` (:meth:`~adasched.runtime.moe.ExpertParallel.create_groups`) holds,
on the ranks of each domain, node n's shard s of every expert tensor: experts ``n*E/ep_size ..`` and FFN columns
``s*ffn/shards ..`` (for SwiGLU's ``w1`` the same columns of the gate half and of the up half). A rank of the new
layout needs its own experts and columns: :func:`overlapping_parts` names the saved parts that hold any of them and
:func:`gather_local_experts` copies the overlaps into the rank's tensor, so a rank reads and holds only the saved
parts it needs, never every expert of a layer (DCP reads any saved key on any rank).

:func:`expert_resharder` is the resharder a :class:`~adasched.runtime.checkpoint.Checkpointer` takes for the state
entry holding a model with :class:`~adasched.runtime.moe.MoELayer` layers and its optimizer
(:class:`~adasched.runtime.checkpoint.ModelState`): what ``launch/train_moe.py`` uses, and what a training loop of
one's own can pass as ``resharders={"model": expert_resharder(model, optimizer)}``."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

__all__ = ["overlapping_parts", "gather_local_experts", "expert_resharder"]


def _span(lo: int, hi: int, a: int, b: int) -> tuple[int, int] | None:
    lo, hi = max(lo, a), min(hi, b)
    return (lo, hi) if lo < hi else None


def overlapping_parts(num_experts: int, ffn: int, ep_size: int, shards: int, offset: int, count: int,
                      cols: slice) -> list[tuple[int, int]]:
    """The parts ``(node, shard)`` of one domain of a saved ``ep_size`` x ``shards`` layout that hold any of experts
    ``offset .. offset + count - 1`` and FFN columns ``cols`` (a step-1 slice), in (node, shard) order."""
    e, f = num_experts // ep_size, ffn // shards
    return [(n, s) for n in range(ep_size) for s in range(shards)
            if _span(n * e, (n + 1) * e, offset, offset + count) and _span(s * f, (s + 1) * f, cols.start, cols.stop)]


def gather_local_experts(parts: Mapping[tuple[int, int], torch.Tensor], which: str, activation: str, ffn: int,
                         num_experts: int, ep_size: int, shards: int, offset: int, count: int,
                         cols: slice) -> torch.Tensor:
    """Experts ``offset .. offset + count - 1`` and FFN columns ``cols`` of a ``w1``/``w2``-shaped tensor (the
    weights, or an optimizer's moments of them) from the saved parts that overlap them (``parts[(n, s)]``: node
    n's shard s of a ``ep_size`` x ``shards`` layout, as :func:`overlapping_parts` names them): what
    :func:`~adasched.runtime.moe.layer.cut_experts` gives for the full tensor, without building it. KeyError when
    a needed part is missing."""
    e, f = num_experts // ep_size, ffn // shards
    c0, c1 = cols.start, cols.stop
    width = c1 - c0
    needed = overlapping_parts(num_experts, ffn, ep_size, shards, offset, count, cols)
    first = parts[needed[0]]
    if which == "w2":
        out = first.new_empty((count, width, first.shape[2]))
    else:
        out = first.new_empty((count, first.shape[1], 2 * width if activation == "swiglu" else width))
    for n, s in needed:
        part = parts[(n, s)]
        (elo, ehi), (clo, chi) = _span(n * e, (n + 1) * e, offset, offset + count), _span(s * f, (s + 1) * f, c0, c1)
        dst_e, src_e = slice(elo - offset, ehi - offset), slice(elo - n * e, ehi - n * e)
        dst_c, src_c = slice(clo - c0, chi - c0), slice(clo - s * f, chi - s * f)
        if which == "w2":
            out[dst_e, dst_c] = part[src_e, src_c]
        else:
            out[dst_e, :, dst_c] = part[src_e, :, src_c]
            if activation == "swiglu":  # the up half: the same columns, after the gate half in each tensor
                out[dst_e, :, width + dst_c.start:width + dst_c.stop] = part[src_e, :, f + src_c.start:f + src_c.stop]
    return out


def _saved_layout(run: Mapping[str, Any]) -> tuple[int, int]:
    return int(run.get("ep_size") or 1), int(run.get("expert_shards") or 1)


def expert_resharder(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, entry: str = "model",
                     saved_layout: Callable[[Mapping[str, Any]], tuple[int, int]] = _saved_layout):
    """A :class:`~adasched.runtime.checkpoint.Checkpointer` resharder for the state entry ``entry`` holding
    ``ModelState(model, [optimizer])``, resuming a save of another expert-parallel layout (or world size).

    The dense weights, buffers, optimizer state and param groups are rank 0's (replicated over the data-parallel
    ranks); each :class:`~adasched.runtime.moe.MoELayer`'s ``w1``/``w2`` and every optimizer state tensor saved with
    the weight's shape (AdamW's ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``; SGD's ``momentum_buffer``; read
    from the save's metadata) are read from the saved parts that overlap this rank's experts and columns, in the
    first domain of the saved layout (ranks ``0 .. ep_size*expert_shards - 1``), and copied into this rank's
    tensors: a rank reads only those parts. ``saved_layout(run) -> (ep_size, expert_shards)`` reads the saved layout
    from the save's run identity (default: its ``ep_size`` and ``expert_shards`` entries, 1 when absent). A save
    lacking a needed key, or whose layout does not divide a layer's experts or width, raises
    :class:`~adasched.profiler.io.InputError` naming it. Parameter names are the state dict's (those of
    ``torch.distributed.checkpoint.state_dict``: a ``torch.compile`` wrapper's prefix removed, as in the save)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from adasched.profiler.io import InputError
    from adasched.runtime.checkpoint import ModelState, load_templates
    from adasched.runtime.moe.layer import MoELayer

    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    by_storage = {(t.data_ptr(), tuple(t.shape)): n for n, t in get_model_state_dict(model).items()}
    experts = {by_storage[(getattr(m, w).data_ptr(), tuple(getattr(m, w).shape))]: (m, w)
               for m in layers for w in ("w1", "w2")}
    pre = f"{entry}."

    def key(j: int, fqn: str, slot: str | None = None) -> str:
        return f"rank{j}/{pre}model.{fqn}" if slot is None else f"rank{j}/{pre}optim.state.{fqn}.{slot}"

    def reshard(info, saved):
        ep_old, s_old = saved_layout(info.run)
        slots, needs = {}, {}                        # fqn -> its weight-shaped state slots / the parts this rank reads
        for fqn, (m, _) in experts.items():
            w0 = saved.get(key(0, fqn))
            if w0 is None:
                raise InputError(info.path, f"cannot reshard this save: it lacks {key(0, fqn)} (saved by "
                                            f"{info.world_size} ranks, EP {ep_old} x {s_old} shards)")
            head = key(0, fqn, "")
            slots[fqn] = [None] + sorted(k[len(head):] for k, v in saved.items()
                                         if k.startswith(head) and "." not in k[len(head):]
                                         and isinstance(v, TensorStorageMetadata) and v.size == w0.size)
            E = m.router.config.num_experts
            if E % ep_old or m.ffn % s_old:
                raise InputError(info.path, f"cannot reshard this save: its layout (EP {ep_old} x {s_old} shards) "
                                            f"does not divide {fqn}'s {E} experts x {m.ffn} FFN columns")
            needs[fqn] = overlapping_parts(E, m.ffn, ep_old, s_old, m.expert_offset, m.w1.shape[0], m.ffn_slice)
        sharded = {key(0, f, sl) for f in experts for sl in slots[f]}
        wanted = [k for k in saved if k.startswith(f"rank0/{pre}") and k not in sharded]
        wanted += [key(n * s_old + s, f, sl) for f in experts for n, s in needs[f] for sl in slots[f]]
        missing = [k for k in wanted if k not in saved]
        if missing:
            raise InputError(info.path, f"cannot reshard this save: it lacks {missing[0]} (saved by "
                                        f"{info.world_size} ranks, EP {ep_old} x {s_old} shards)")
        # each part as the saved layout cuts it: a save whose recorded layout is not its tensors' (an edited or
        # copied adasched-checkpoint.json) failed in the copy with a tensor-size traceback
        for fqn, (m, which) in experts.items():
            E, hidden = m.router.config.num_experts, m.w1.shape[1]
            cols = m.ffn // s_old * (2 if which == "w1" and m.activation == "swiglu" else 1)
            want = (E // ep_old, hidden, cols) if which == "w1" else (E // ep_old, m.ffn // s_old, hidden)
            for n, sh in needs[fqn]:
                for sl in slots[fqn]:
                    k = key(n * s_old + sh, fqn, sl)
                    got = tuple(getattr(saved[k], "size", ()))
                    if got != want:
                        raise InputError(info.path, f"cannot reshard this save: {k} has shape {list(got)}, but its "
                                                    f"recorded layout (EP {ep_old} x {s_old} shards, saved by "
                                                    f"{info.world_size} ranks) cuts it to {list(want)}")

        def finish(loaded):
            model_sd, state, groups = {}, {}, {}
            for k, v in loaded.items():
                if not k.startswith(f"rank0/{pre}") or k in sharded:
                    continue
                rest = k[len(f"rank0/{pre}"):]
                if rest.startswith("model."):
                    model_sd[rest[len("model."):]] = v
                elif rest.startswith("optim.state."):
                    fqn, slot = rest[len("optim.state."):].rsplit(".", 1)
                    state.setdefault(fqn, {})[slot] = v
                elif rest.startswith("optim.param_groups."):
                    i, name = rest[len("optim.param_groups."):].split(".", 1)
                    groups.setdefault(int(i), {})[name] = v
            for fqn, (m, which) in experts.items():
                E = m.router.config.num_experts
                for slot in slots[fqn]:
                    parts = {(n, s): loaded[key(n * s_old + s, fqn, slot)] for n, s in needs[fqn]}
                    mine = gather_local_experts(parts, which, m.activation, m.ffn, E, ep_old, s_old,
                                                m.expert_offset, m.w1.shape[0], m.ffn_slice)
                    if slot is None:
                        model_sd[fqn] = mine
                    else:
                        state.setdefault(fqn, {})[slot] = mine
            ModelState(model, [optimizer]).load_state_dict(
                {"model": model_sd, "optim": {"state": state, "param_groups": [groups[i] for i in sorted(groups)]}})

        return load_templates(saved, wanted), finish

    return reshard
