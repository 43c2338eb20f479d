"""FlexSP cost model: time and memory of one Ulysses SP group of degree d running a packed set of sequences.

Follows ../shared/papers/flexsp.md (Ulysses SP, ZeRO-3 model states sharded over all N GPUs)::

    Time(d, S) = (1/d) * sum_{s in S} (a1 s^2 + a2 s) + b1 + T_comm(d, S)
    T_comm     = sum_{s in S} beta(d) * (8 * L * h * s * 2 bytes) / d  + alpha(d) * 8 * L     (d > 1, else 0)
    Mem(d, S)  = sum_{s in S} s * act_bytes_per_token / d + model_state_bytes                   <= E

with beta(d), alpha(d) the alpha-beta all-to-all fit of ``profile.collective("all_to_all", d)`` (the message
is the per-rank tensor: q, k, v, o forward + backward = 8 all-to-alls per layer, bf16 = 2 bytes; alpha is
paid once per all-to-all call, i.e. 8 * L times per micro-batch; the published fits have alpha = 0).
Groups of degree <= gpus_per_node use the intra-node fit, larger ones the inter-node fit (the profile's fit
for that group size carries its scope); on nodes whose size a degree does not divide (6 GPUs, degree 4) some
buddy-aligned groups of that degree straddle two nodes, so that degree takes the inter-node fit.

Where the compute terms come from (:func:`sp_cost_model`):

- ``profile.model_costs[model]`` (the published A100 calibration, a100-64-flexsp-paper): a1, a2, b1 and the
  activation bytes per token are used as published;
- otherwise they are derived from the profile's single-layer fits (h100-sxm):
  attention (per layer, fwd+bwd, fitted for ``heads x head_dim`` = h_att):  both the s^2 and the s term scale
  with the attention width, so ``a1 = L * att.a1 * h / h_att`` and the s-part of ``a2`` likewise;
  linear layers (per token per layer, fitted at hidden h_lin with its MLP): FLOPs per token scale with
  hidden^2 (QKV/O are 4 h^2, the MLP ~ 8 h^2 at a fixed ratio), so ``a2 += L * lin.ms_per_token * (h/h_lin)^2``;
  ``b1 = L * (att.b + lin.b)`` (clipped at 0) plus the ZeRO-3 parameter traffic of one micro-batch
  (2 all-gathers + 1 reduce-scatter of the bf16 parameters, per-rank share 2*P/N bytes; ZeRO-2: the
  reduce-scatter only, ZeRO-0/1: none per micro-batch - ``ModelShape.zero_stage``) when the profile has
  those fits (none -> 0); a ZeRO group larger than every fit (h100-sxm: fitted on one 8-GPU node, 64 GPUs) gets
  the profile's two-level intra + inter-node estimate, which the cost model's ``source`` names.

Units: ms, bytes, tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from adasched.profiler.io import InputError
from adasched.profiler.profile import ClusterProfile

__all__ = ["ModelShape", "MODEL_PRESETS", "model_preset", "SPCostModel", "sp_cost_model", "powers_of_two"]

MiB = 1024 * 1024
GiB = 1024 ** 3


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """A GPT-style decoder."""

    name: str
    hidden: int
    """Model width h."""
    layers: int
    """Transformer layers L."""
    heads: int
    """Attention heads (Ulysses scatters heads over the group)."""
    vocab: int = 32000
    act_bytes_per_token: float
    """Activation memory per token for the whole model (bytes; FlexSP's published figure for the presets,
    which is close to the 34 * h * L bytes of Korthikanti et al. with flash attention)."""
    zero_stage: int = 3
    state_bytes_per_param: int = 16
    """bf16 weights + bf16 grads + fp32 master, Adam m and v (mixed-precision Adam)."""

    @property
    def params(self) -> int:
        """Parameter count: 12 L h^2 (attention + 4h MLP) + embedding and output head (2 V h)."""
        return 12 * self.layers * self.hidden * self.hidden + 2 * self.vocab * self.hidden

    def model_state_bytes(self, world: int) -> float:
        """Per-GPU model-state bytes: ZeRO-3 shards all states over the ``world`` GPUs (stage 0 keeps them whole)."""
        total = float(self.state_bytes_per_param) * self.params
        if self.zero_stage >= 3:
            return total / world
        if self.zero_stage == 0:
            return total
        # stage 1/2: bf16 weights replicated (and grads for stage 1), optimizer states sharded
        rep = (4 if self.zero_stage == 1 else 2) * self.params
        return rep + (total - rep) / world


MODEL_PRESETS: dict[str, ModelShape] = {
    "gpt-7b": ModelShape(name="gpt-7b", hidden=4096, layers=32, heads=32, act_bytes_per_token=4.4804 * MiB),
    "gpt-13b": ModelShape(name="gpt-13b", hidden=5120, layers=40, heads=40, act_bytes_per_token=4.2204 * MiB),
    "gpt-30b": ModelShape(name="gpt-30b", hidden=6656, layers=60, heads=52, act_bytes_per_token=3.4174 * MiB),
}


def model_preset(name: str) -> ModelShape:
    if name not in MODEL_PRESETS:
        raise InputError("--model", f"unknown model {name!r} (known: {', '.join(MODEL_PRESETS)})")
    return MODEL_PRESETS[name]


def powers_of_two(n: int) -> list[int]:
    """1, 2, 4, ... <= n."""
    out, d = [], 1
    while d <= n:
        out.append(d)
        d *= 2
    return out


@dataclass(kw_only=True)
class SPCostModel:
    """Cost of SP groups on ``world`` GPUs. Per degree d (a power of two <= world) a group's time is
    ``alpha[d] * sum s^2 + beta[d] * sum s + gamma[d]`` (ms) and its memory ``act/d * sum s + model_state``."""

    model: ModelShape
    world: int
    gpus_per_node: int
    memory_bytes: float
    """E: device memory per GPU (bytes)."""
    a1: float
    """ms per token^2 (whole model, fwd+bwd, on one GPU)."""
    a2: float
    """ms per token (whole model)."""
    b1: float
    """ms per micro-batch and group (fixed)."""
    act_bytes_per_token: float
    model_state_bytes: float
    a2a_alpha_ms: dict[int, float] = field(default_factory=dict)
    a2a_beta_ms_per_byte: dict[int, float] = field(default_factory=dict)
    source: str = ""

    # ---- per-degree coefficients ------------------------------------------------------------------
    @property
    def degrees(self) -> list[int]:
        """Degrees a group may have: powers of two up to the world size. A degree d that does not divide the
        head count H runs with uneven head splits (runtime/ulysses.head_range): the busiest rank's attention
        does ceil(H/d) / (H/d) of the even share (gpt-13b at d=16: 1.2x); the cost model, the paper's, does not
        charge for that."""
        return powers_of_two(self.world)

    def comm_bytes_per_token(self) -> float:
        """All-to-all bytes per token of the sequence (summed over the 8 L calls, before dividing by d)."""
        return 8.0 * self.model.layers * self.model.hidden * 2.0

    def coeffs(self, d: int) -> tuple[float, float, float]:
        """(alpha, beta, gamma): time(d, S) = alpha * sum s^2 + beta * sum s + gamma (ms), for a non-empty S."""
        if d == 1:
            return self.a1, self.a2, self.b1
        beta_comm = self.a2a_beta_ms_per_byte[d] * self.comm_bytes_per_token() / d
        gamma = self.b1 + self.a2a_alpha_ms[d] * 8 * self.model.layers
        return self.a1 / d, self.a2 / d + beta_comm, gamma

    def token_capacity(self, d: int) -> float:
        """Most tokens a group of degree d can hold in one micro-batch (with :meth:`fits`'s 1e-12 tolerance: without
        it a sequence needing exactly the device memory fitted there and nowhere else - refused as too long, a
        lower bound above a plan that fits)."""
        free = self.memory_bytes * (1 + 1e-12) - self.model_state_bytes
        return max(0.0, free) * d / self.act_bytes_per_token

    def min_degree(self, seqlen: float) -> int | None:
        """Smallest degree whose group can hold one sequence of this length (None: not even all GPUs)."""
        for d in self.degrees:
            if seqlen <= self.token_capacity(d):
                return d
        return None

    def memory_needed(self, seqlen: float, d: int) -> float:
        """Per-GPU bytes for one sequence of ``seqlen`` on a group of degree d."""
        return seqlen * self.act_bytes_per_token / d + self.model_state_bytes

    # ---- evaluation on real lengths --------------------------------------------------------------
    def group_time(self, d: int, seqlens) -> float:
        """ms for a group of degree d running ``seqlens`` packed (0 for an empty group)."""
        s = np.asarray(seqlens, dtype=np.float64)
        if s.size == 0:
            return 0.0
        a, b, g = self.coeffs(d)
        return float(a * np.dot(s, s) + b * s.sum() + g)

    def group_memory(self, d: int, seqlens) -> float:
        """Per-GPU bytes of a group of degree d running ``seqlens``."""
        return (float(np.sum(np.asarray(seqlens, dtype=np.float64))) * self.act_bytes_per_token / d
                + self.model_state_bytes)

    def fits(self, d: int, seqlens) -> bool:
        return self.group_memory(d, seqlens) <= self.memory_bytes * (1 + 1e-12)


def _zero3_ms(profile: ClusterProfile, model: ModelShape, world: int) -> float:
    """ZeRO-3 parameter traffic per micro-batch (ms); see :func:`_zero3`."""
    return _zero3(profile, model, world)[0]


def _zero3(profile: ClusterProfile, model: ModelShape, world: int) -> tuple[float, str]:
    """(ms, note): ZeRO-3 parameter traffic per micro-batch: all-gather fwd + all-gather bwd + reduce-scatter grads
    of the bf16 parameters over the ``world`` GPUs. Messages as CollectiveFit counts them (the tensor each rank
    passes in): all_gather the rank's shard 2 * P / world bytes, reduce_scatter the whole unreduced gradient 2 * P
    bytes. A fit covering ``world`` ranks is used as it is; a larger group (e.g. 64 ranks on the h100-sxm profile,
    whose all_gather/reduce_scatter are fitted on one 8-GPU node) gets the profile's two-level estimate
    (:meth:`ClusterProfile.collective_two_level`: intra-node fit + inter-node part at one GPU's share of the
    inter-node bandwidth of the largest inter-node all_to_all fit - the network this cost model already charges
    the SP all-to-alls at; h100-sxm borrows FlexSP's A100 all-to-all and FSMoE's ~30x slower all-reduce testbed,
    and pricing ZeRO-3 on the other cluster's link made it 12x the SP traffic's network), named in the note; an
    error if the profile has nothing inter-node. 0 (and no note) if the profile has no such fits. Per the model's
    ``zero_stage``: ZeRO-3 gathers the parameters (2 all-gathers) and reduce-scatters the gradients each
    micro-batch; ZeRO-2 keeps the parameters (no all-gather) and reduce-scatters each micro-batch's gradients;
    ZeRO-0/1 all-reduce the gradients once per step, not per micro-batch: nothing here (every stage was charged
    ZeRO-3's two all-gathers)."""
    total, notes = 0.0, []
    per_mb = {"all_gather": 2 if model.zero_stage >= 3 else 0, "reduce_scatter": 1 if model.zero_stage >= 2 else 0}
    have = {op: bool(profile.group_sizes(op)) for op in ("all_gather", "reduce_scatter")}
    needed = [op for op, n in per_mb.items() if n]
    if world > 1 and len({have[op] for op in needed}) > 1:  # (priced in part, silently: b1 lost 2/3)
        missing = next(op for op in needed if not have[op])
        other = next(op for op in needed if have[op])
        raise InputError(profile.where, f"has {other} fits but no {missing} fit: ZeRO-3's parameter "
                                                      f"traffic needs both (or neither: then it is not charged)")
    for op, times, nbytes in (("all_gather", per_mb["all_gather"], 2.0 * model.params / world),
                              ("reduce_scatter", per_mb["reduce_scatter"], 2.0 * model.params)):
        if not have[op] or world <= 1 or times == 0:
            continue
        fit = profile.collective_two_level(op, world, link_op="all_to_all")
        total += times * fit.time_ms(nbytes)
        if fit.source.startswith("two-level estimate"):
            notes.append(f"ZeRO-{model.zero_stage} {op} on {world} ranks: {fit.source}")
    return total, "; ".join(notes)


def sp_cost_model(profile: ClusterProfile, model: ModelShape | str, world: int | None = None) -> SPCostModel:
    """Build the cost model for ``model`` on the first ``world`` GPUs of ``profile`` (default: all)."""
    if isinstance(model, str):
        model = model_preset(model)
    if world is None and profile.world_size & (profile.world_size - 1):  # (blamed --gpus, which was not given)
        raise InputError(profile.where, f"describes {profile.world_size} GPUs, not a power of two "
                                                      f"(Ulysses groups are buddy-aligned powers of two): pass --gpus")
    world = profile.world_size if world is None else world
    if world < 1 or world & (world - 1):
        raise InputError("--gpus", f"{world} is not a power of two (Ulysses groups are buddy-aligned powers of two)")
    if world > profile.world_size:
        raise InputError("--gpus", f"{world} GPUs but {profile.where} describes {profile.world_size} "
                                   f"({profile.num_nodes} node{'s' if profile.num_nodes != 1 else ''} x {profile.gpus_per_node})")
    mc = profile.model_costs.get(model.name)
    if mc is not None and (mc.hidden, mc.layers) != (model.hidden, model.layers):
        # the published terms are for the model the profile names; the communication term uses the preset's
        # shape - a profile of another shape under this name planned with its terms and the preset's shape, silently
        raise InputError(profile.where, f"model_costs[{model.name!r}]: hidden {mc.hidden}, layers "
                                                      f"{mc.layers}, but model {model.name!r} has hidden "
                                                      f"{model.hidden}, layers {model.layers}")
    if mc is not None:
        a1, a2, b1, act = mc.a1_ms_per_tok2, mc.a2_ms_per_tok, mc.b1_ms, mc.act_bytes_per_token
        source = f"published per-model terms: {mc.source}"
    else:
        if profile.attention is None or profile.linear is None:
            raise InputError(profile.where,
                             f"has neither model_costs[{model.name!r}] nor attention+linear fits to derive them from")
        att, lin = profile.attention, profile.linear
        L, h = model.layers, model.hidden
        w_att = h / float(att.heads * att.head_dim)
        a1 = L * att.a1_ms_per_tok2 * w_att
        a2 = L * (att.a2_ms_per_tok * w_att + lin.ms_per_token * (h / lin.hidden) ** 2)
        zero3_ms, zero3_note = _zero3(profile, model, world)
        b1 = max(0.0, L * (att.b_ms + lin.b_ms)) + zero3_ms
        act = model.act_bytes_per_token
        source = "derived from profile attention (x h/h_att per layer) and linear (x (h/h_lin)^2 per layer) fits"
        if zero3_note:
            source += f"; {zero3_note}"
    alpha, beta = {}, {}
    G = profile.gpus_per_node
    for d in powers_of_two(world)[1:]:
        # groups are buddy-aligned blocks of d ranks: with a node size d does not divide (6 GPUs, d = 4) some blocks
        # straddle two nodes (ranks 4-7) - priced as inter-node, for every group of that degree (conservative; the
        # intra-node fit made such a micro-batch ~50 % faster than its group could run)
        straddles = world > G and d < G and G % d != 0
        fit = profile.collective("all_to_all", d, across_nodes=straddles)
        alpha[d], beta[d] = fit.alpha_ms, fit.beta_ms_per_byte
    return SPCostModel(
        model=model, world=world, gpus_per_node=profile.gpus_per_node, memory_bytes=float(profile.memory_bytes),
        a1=a1, a2=a2, b1=b1, act_bytes_per_token=act, model_state_bytes=model.model_state_bytes(world),
        a2a_alpha_ms=alpha, a2a_beta_ms_per_byte=beta, source=source,
    )


def check_model_states(cm: SPCostModel, profile: ClusterProfile) -> None:
    """Refuse a cost model whose GPUs cannot hold even the model states (no sequence fits), blaming what can change:
    ``--gpus`` when fewer GPUs than the profile describes were asked for, else the profile (its device memory), with
    how many GPUs of its nodes would hold them (ZeRO shards the states over more GPUs) and how to describe them.
    (It said "--gpus ... add GPUs" when --gpus was not given and the profile already described all it could.)"""
    if cm.token_capacity(cm.world) >= 1:
        return
    need = f"{cm.model_state_bytes / GiB:.1f} GiB per GPU"
    zero = f"ZeRO-{cm.model.zero_stage}"
    if cm.world < profile.world_size:
        raise InputError("--gpus", f"the {cm.model.name} model states alone need {need} on {cm.world} GPUs ({zero}), "
                                   f"more than the device's {cm.memory_bytes / GiB:.1f} GiB: no sequence fits; add "
                                   f"GPUs (the profile describes {profile.world_size})")
    from adasched.profiler.profile import MAX_GPUS, more_nodes_hint

    w = cm.world * 2
    while w <= MAX_GPUS and cm.model.model_state_bytes(w) >= cm.memory_bytes:
        w *= 2
    if w > MAX_GPUS:
        fix = "no number of these devices holds them: a profile of a device with more memory"
    else:
        fix = f"they fit on {w} such GPUs: " + more_nodes_hint(profile, w)
    raise InputError(profile.where, f"device memory {cm.memory_bytes / GiB:.1f} GiB holds not even the "
                                    f"{cm.model.name} model states ({need} on all its {cm.world} GPUs, {zero}): no "
                                    f"sequence fits; {fix}")


def ceil_div(a: float, b: float) -> int:
    return int(math.ceil(a / b - 1e-12))
