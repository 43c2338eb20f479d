"""ClusterProfile: what the cluster is and how fast, as typed, versioned JSON.

Units: times in ms, sizes in bytes, bandwidths in GB/s (1e9 bytes/s), sequence lengths in tokens.
Every fitted model carries its relative fit error and where its numbers come from (`source`).
"""
from __future__ import annotations

import numbers
import os
from typing import Any, ClassVar, Literal

from pydantic import (BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, PrivateAttr, field_validator,
                      model_validator)

from .io import InputError, atomic_write_json, check_iso_time, first_non_finite, load_model

__all__ = [
    "SCHEMA_VERSION",
    "CollectiveOp",
    "CollectiveFit",
    "bus_factor",
    "AttentionFit",
    "LinearFit",
    "ModelCost",
    "DeviceInfo",
    "ClusterProfile",
    "load_profile",
    "save_profile",
]

SCHEMA_VERSION = 1
CollectiveOp = Literal["all_to_all", "all_reduce", "all_gather", "reduce_scatter", "broadcast"]


#: smallest beta a collective fit takes (ms per byte): 1 PB/s per rank. 5e-324 loaded and showed "inf GB/s", and an
#: inter-node step priced with it cost nothing
MIN_BETA_MS_PER_BYTE = 1e-12
#: largest beta (ms per byte: 1 kB/s) and alpha (ms: 1,000 s) a collective fit takes: 1e300 loaded and the planners
#: failed far from the file ("fwd_bwd_ms: Input should be a finite number")
MAX_BETA_MS_PER_BYTE = 1.0
MAX_ALPHA_MS = 1e6
#: bounds of the compute fits' per-token terms (ms per token^2, ms per token): 1 ms per token^2 prices a 10^5-token
#: sequence at 10^10 ms, still a number the planners' solvers and simulations take
MAX_A1_MS_PER_TOK2 = 1.0
MAX_A2_MS_PER_TOK = 1e3
#: a fit's mean relative error beyond which it is no fit (100 = 10,000 %: 1e9 was shown as "100000000000.0%")
MAX_FIT_REL_ERROR = 100.0
#: most memory a device may declare (bytes): 1 PiB (2**70 loaded)
MAX_DEVICE_MEMORY_BYTES = 2**50
#: one device's dense GEMM rate and copy bandwidth, with room to spare (an H100 ~1,000 TFLOP/s bf16, HBM3e ~8,000
#: GB/s): a FLOP/s or B/s value typed into these fields (4.17e10) was accepted and planned with
MAX_TFLOPS = 1e5
MIN_TFLOPS = 1e-6
MAX_COPY_GBPS = 1e5
MIN_COPY_GBPS = 1e-6
#: most GPUs a profile may describe (num_nodes x gpus_per_node), the planners' world-size cap (FlexSP MAX_WORLD):
#: num_nodes 10**9 loaded and the planners' --gpus checks took it
MAX_GPUS = 2**16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, allow_inf_nan=False,
                              protected_namespaces=())  # (model_costs: pydantic < 2.10 warned, 2.0 raised)


def group_scope(g: int, ranks_per_node: int, world: int) -> Literal["intra", "inter"]:
    """'intra' when every group of g contiguous ranks stays inside one node (ranks numbered node by node, as
    torchrun does): one node, or g divides the ranks per node; else 'inter' (6 ranks a node: ranks 4..7 of a
    4-rank group straddle two nodes). The one rule for measured fits and for :meth:`ClusterProfile.with_nodes`."""
    return "intra" if world <= ranks_per_node or ranks_per_node % g == 0 else "inter"


class CollectiveFit(_Strict):
    """alpha-beta model of one collective on one group size: time_ms = alpha_ms + beta_ms_per_byte * bytes.

    `bytes` is the message size per rank: the tensor each rank passes in. all_reduce, all_to_all, broadcast:
    the whole buffer; all_gather: the rank's shard (the output is group_size times larger); reduce_scatter:
    the whole unreduced buffer (the output shard is 1/group_size of it). nccl-tests' "size" is the same except
    for all_gather, where it is the gathered output (group_size x bytes); see :attr:`bus_bandwidth_GBps`."""

    op: CollectiveOp
    group_size: int = Field(ge=2, description="ranks in the group (a collective on one rank moves nothing: its bus "
                                              "factor is 0)")
    scope: Literal["intra", "inter"] = Field(description="intra: the group stays inside one node; inter: it crosses nodes")
    alpha_ms: float = Field(ge=0.0, le=MAX_ALPHA_MS, description="ms per call; at most 1e6 (1,000 s: a larger one "
                                                                  "overflowed the planners' sums far from the file)")
    beta_ms_per_byte: float = Field(ge=MIN_BETA_MS_PER_BYTE, le=MAX_BETA_MS_PER_BYTE,
                                    description="ms per byte; at least 1e-12 (1 PB/s per rank: a smaller one reads as "
                                                "an infinite link), at most 1 (1 kB/s)")
    fit_rel_error: float = Field(default=0.0, ge=0.0, le=MAX_FIT_REL_ERROR, description="mean |pred - meas| / meas over the fitted points")
    source: str = "measured"

    def time_ms(self, nbytes: float) -> float:
        return self.alpha_ms + self.beta_ms_per_byte * float(nbytes)

    @property
    def bandwidth_GBps(self) -> float:
        """Asymptotic bandwidth (bytes per rank / time) in GB/s, 1 GB = 1e9 bytes."""
        return 1.0 / (self.beta_ms_per_byte * 1e6)

    @property
    def bus_bandwidth_GBps(self) -> float:
        """Asymptotic bus bandwidth in GB/s as nccl-tests and DeepSpeed's comms logger report it (n = group
        size, B = bytes per rank as above, t = time): all_reduce 2(n-1)/n * B/t; all_to_all and reduce_scatter
        (n-1)/n * B/t; all_gather (n-1)/n * nB/t (nccl-tests' size is the gathered output); broadcast B/t."""
        return bus_factor(self.op, self.group_size) * self.bandwidth_GBps


def bus_factor(op: CollectiveOp, n: int) -> float:
    """nccl-tests' bus-bandwidth factor: time = bus_factor * bytes / busbw for `bytes` per rank as
    :class:`CollectiveFit` counts them on n ranks (all_reduce 2(n-1)/n, all_gather n-1, broadcast 1, all_to_all
    and reduce_scatter (n-1)/n)."""
    return {"all_reduce": 2.0 * (n - 1) / n, "all_gather": float(n - 1), "broadcast": 1.0}.get(op, (n - 1) / n)


class AttentionFit(_Strict):
    """Causal attention of one layer, fwd+bwd: time_ms(s) = a1 * s^2 + a2 * s + b (s = sequence length)."""

    # bounded like the collective fits (1e300 in a profile file was a traceback or a solver's two-line refusal in
    # plan sp, and a plan of 3e303 ms from plan lora): far above any device's (h100-sxm: 5.1e-8, 7.0e-5, 0.046)
    a1_ms_per_tok2: float = Field(ge=0.0, le=MAX_A1_MS_PER_TOK2)
    a2_ms_per_tok: float = Field(ge=0.0, le=MAX_A2_MS_PER_TOK)
    b_ms: float = Field(default=0.0, ge=0.0, le=MAX_ALPHA_MS)
    heads: PositiveInt = 32
    head_dim: PositiveInt = 128
    fit_rel_error: float = Field(default=0.0, ge=0.0, le=MAX_FIT_REL_ERROR)
    source: str = "measured"

    @model_validator(mode="after")
    def _grows_with_length(self) -> "AttentionFit":
        if self.a1_ms_per_tok2 == 0 and self.a2_ms_per_tok == 0:  # (the planners divided by the length term)
            raise ValueError("a1_ms_per_tok2 and a2_ms_per_tok: both 0 - attention that costs the same at every "
                             "length; at least one must be > 0")
        return self

    def time_ms(self, seqlen: float) -> float:
        return self.a1_ms_per_tok2 * seqlen * seqlen + self.a2_ms_per_tok * seqlen + self.b_ms


class LinearFit(_Strict):
    """Linear layers (QKV, O, MLP) of one transformer layer, fwd+bwd: time_ms(t) = ms_per_token * t + b_ms."""

    ms_per_token: float = Field(gt=0.0, le=MAX_A2_MS_PER_TOK)  # (bounded as AttentionFit's terms)
    b_ms: float = Field(default=0.0, ge=0.0, le=MAX_ALPHA_MS)
    hidden: PositiveInt = 4096
    ffn_hidden: PositiveInt = 11008
    fit_rel_error: float = Field(default=0.0, ge=0.0, le=MAX_FIT_REL_ERROR)
    source: str = "measured"

    def time_ms(self, tokens: float) -> float:
        return self.ms_per_token * tokens + self.b_ms


class ModelCost(_Strict):
    """Whole-model per-sequence cost terms published for a model (FlexSP form):
    compute_ms(s) = a1 * s^2 + a2 * s summed over a group's sequences, plus b1 per step."""

    hidden: PositiveInt
    layers: PositiveInt
    a1_ms_per_tok2: float = Field(ge=0.0, le=MAX_A1_MS_PER_TOK2)  # (bounded as AttentionFit's terms; gpt-30b's
    a2_ms_per_tok: float = Field(ge=0.0, le=MAX_A2_MS_PER_TOK)    # published: 1.5e-5, 0.80, 2,789)
    b1_ms: float = Field(ge=0.0, le=MAX_ALPHA_MS)
    act_bytes_per_token: PositiveFloat
    source: str

    @model_validator(mode="after")
    def _grows_with_length(self) -> "ModelCost":
        if self.a1_ms_per_tok2 == 0 and self.a2_ms_per_tok == 0:  # (plan sp died dividing by the work term)
            raise ValueError("a1_ms_per_tok2 and a2_ms_per_tok: both 0 - a model whose sequences cost nothing; at "
                             "least one must be > 0")
        if self.act_bytes_per_token < 2 * self.hidden:
            # flexsp.md's "act MB/token" typed into this bytes field (4.48 for 4.48 MiB) planned with ~10^6 times too
            # little activation memory and passed every memory limit; a token keeps at least one bf16 hidden vector
            raise ValueError(f"act_bytes_per_token: {self.act_bytes_per_token:g} is under one bf16 hidden vector "
                             f"(2 x hidden = {2 * self.hidden} bytes): the field is in bytes (4.48 MiB = "
                             f"{round(4.48 * 2**20)})")
        return self


def _finite_free_form(v: dict | None) -> dict | None:
    """A free-form dict (raw, host, topology) holds no NaN/Infinity: pydantic's allow_inf_nan=False does not reach
    ``Any`` values, and a save wrote them as null (a round trip changed the file)."""
    hit = None if v is None else first_non_finite(v)
    if hit is not None:
        raise ValueError(f"{hit[0]}: {hit[1]} is not a JSON number (NaN and infinities are refused)")
    return v


class DeviceInfo(_Strict):
    kind: Literal["gpu", "cpu"]
    name: str
    memory_bytes: PositiveInt
    count_per_node: PositiveInt = 1
    sm_clock_mhz: float | None = Field(default=None, ge=0.0)
    mem_clock_mhz: float | None = Field(default=None, ge=0.0)
    nvlink_links: int | None = Field(default=None, ge=0)
    pcie_gen: int | None = Field(default=None, ge=0)
    power_limit_w: float | None = Field(default=None, ge=0.0)
    topology: dict[str, Any] | None = Field(default=None, description="GPU-GPU link matrix from NVML where available")
    driver: str | None = None

    _finite_topology = field_validator("topology")(_finite_free_form)

    @field_validator("memory_bytes")
    @classmethod
    def _memory_in_bytes(cls, v: int) -> int:
        if v < 2**20:  # 80 (GiB) or 81920 (MiB) typed into a bytes field: a planner would fit nothing
            raise ValueError(f"{v} is under 1 MiB: the field is in bytes (80 GiB = {80 * 2**30})")
        if v > MAX_DEVICE_MEMORY_BYTES:
            raise ValueError(f"{v} is over 1 PiB ({MAX_DEVICE_MEMORY_BYTES}): not one device's memory in bytes")
        return v


class ClusterProfile(_Strict):
    SCHEMA_VERSION: ClassVar[int] = SCHEMA_VERSION  # read by load_model
    KIND: ClassVar[str] = "cluster_profile"

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["cluster_profile"] = "cluster_profile"
    # the file it was read from (load_profile), which the planners' refusals name: "profile 'h100-sxm': lacks
    # 'collectives'" blamed the built-in for an edited copy of it
    _origin: str | None = PrivateAttr(default=None)
    name: str = Field(min_length=1)
    source: str = Field(description="where the numbers come from (measured on host X / published in paper Y)")
    # when it was measured: set where a profile is made (profiler.local). A file without one loads as None - a
    # load-time stamp gave the same file another digest on every load, and a resumed train_lora refused it
    created: str | None = None
    num_nodes: PositiveInt = 1
    gpus_per_node: PositiveInt = 1
    device: DeviceInfo
    host: dict[str, Any] = Field(default_factory=dict)
    # floors as the collectives' (1e-300 TFLOP/s planned a 5e295 ms MoE step, 5e-324 an unlocated 'inf'):
    # 1 MFLOP/s and 1 kB/s, far below any host
    gemm_tflops: float | None = Field(default=None, ge=MIN_TFLOPS, le=MAX_TFLOPS,
                                      description="TFLOP/s (not FLOP/s); at least 1e-6")
    copy_GBps: float | None = Field(default=None, ge=MIN_COPY_GBPS, le=MAX_COPY_GBPS,
                                    description="GB/s (not B/s); at least 1e-6")
    attention: AttentionFit | None = None
    linear: LinearFit | None = None
    collectives: list[CollectiveFit] = Field(default_factory=list)
    model_costs: dict[str, ModelCost] = Field(default_factory=dict)
    raw: dict[str, Any] = Field(default_factory=dict, description="raw measurements the fits came from")

    _finite_free_form = field_validator("host", "raw")(_finite_free_form)

    @field_validator("created")
    @classmethod
    def _iso_time(cls, v: str | None) -> str | None:
        return None if v is None else check_iso_time(v)

    @field_validator("name")
    @classmethod
    def _named(cls, v: str) -> str:
        if not v.strip():  # min_length=1 took "  ", which the reports and the with_nodes names then carried
            raise ValueError("must not be blank")
        return v

    @model_validator(mode="after")
    def _check(self) -> "ClusterProfile":
        if self.world_size > MAX_GPUS:
            # (digits from the bit length: str() of a 4,300-digit int raises ValueError itself)
            big = lambda v: str(v) if v <= MAX_GPUS else f"(a number of ~{int(v.bit_length() * 0.30103) + 1} digits)"  # noqa: E731,E501
            raise ValueError(f"num_nodes x gpus_per_node = {big(self.num_nodes)} x {big(self.gpus_per_node)} = "
                             f"{big(self.world_size)} GPUs, more than the {MAX_GPUS} a profile may describe")
        if self.num_nodes == 1 and any(c.scope == "inter" for c in self.collectives):
            # one node has no links between nodes (with_nodes(1) wrote such fits before 2026-12-04; a hand edit)
            self.collectives = _one_node_fits(self.collectives)
        seen = set()
        for c in self.collectives:
            key = (c.op, c.group_size)
            if key in seen:
                raise ValueError(f"collectives: duplicate fit for {c.op} on group size {c.group_size}")
            seen.add(key)
            if c.group_size > self.world_size:
                raise ValueError(
                    f"collectives: {c.op} fitted on group size {c.group_size} > world size {self.world_size}"
                )
            if c.group_size > self.gpus_per_node and c.scope != "inter":  # it cannot fit in one node
                raise ValueError(f"collectives: {c.op} fitted on group size {c.group_size} with scope {c.scope!r}, "
                                 f"but a node holds {self.gpus_per_node} GPUs (it crosses nodes: 'inter')")
        return self

    # ---- queries -------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def memory_bytes(self) -> int:
        return self.device.memory_bytes

    def group_sizes(self, op: CollectiveOp) -> list[int]:
        return sorted(c.group_size for c in self.collectives if c.op == op)

    def collective(self, op: CollectiveOp, group_size: int, *, across_nodes: bool = False) -> CollectiveFit:
        """The fit for `op` on `group_size` ranks: the smallest fit at least that large - a size between fitted
        sizes, or below the smallest, uses the next larger fit (conservative: a fit over more ranks, or across
        nodes, is not faster; a planner's notes name the fit's group size) -; a size above the largest fit is an
        error naming what exists.

        Groups are taken as node-packed (contiguous ranks, numbered node by node: Megatron's tensor and context
        parallel groups, FlexSP's SP groups), so a group no larger than a node is an intra-node one. A group
        whose ranks sit on different nodes whatever its size (Megatron/DeepSpeed data-parallel groups on
        several nodes take ranks a node apart) passes ``across_nodes=True``: only inter-node fits are used."""
        if group_size < 1:
            raise InputError("group_size", f"must be >= 1, got {group_size}")
        fits = sorted((c for c in self.collectives if c.op == op), key=lambda c: c.group_size)
        if not fits:
            raise InputError(self.where, f"has no {op} fit (a planner needs collectives.{op})")
        if across_nodes:
            fits = [c for c in fits if c.scope == "inter"]
            if not fits:
                raise InputError(self.where, f"has no inter-node {op} fit (measured on one node?)")
        for c in fits:
            if c.group_size >= group_size:
                return c
        raise InputError(
            self.where,
            f"{'inter-node ' if across_nodes else ''}{op} fitted up to group size {fits[-1].group_size}, "
            f"asked for {group_size}",
        )

    def collective_two_level(self, op: CollectiveOp, group_size: int, *,
                             link_op: CollectiveOp | None = None) -> CollectiveFit:
        """:meth:`collective` when a fit of `op` covers `group_size`; for a larger node-packed group of k >= 2
        whole nodes (G = gpus_per_node ranks each) a two-level estimate, returned as a CollectiveFit whose
        `source` starts with "two-level estimate" (time still alpha + beta * bytes, bytes as CollectiveFit counts):

        - all_gather (shard s): an all-gather of s among the k ranks with the same local index (one per node),
          then one of the k*s gathered bytes inside each node (the intra fit on G ranks);
        - reduce_scatter (buffer B): inside each node on G ranks (B -> B/G), then among the k nodes on B/G;
        - all_reduce (buffer B): intra reduce_scatter, inter all_reduce of B/G over k nodes, intra all_gather.

        The G concurrent k-rank steps (one per local index) share the node's inter-node links, so each runs at
        one GPU's share of them, taken with the alpha of one inter-node fit: of the fits with the largest
        inter-node group, the one whose share is lowest (conservative). A fit's bus bandwidth (:func:`bus_factor`)
        is not that share for every op: a flat ring collective (all_reduce, all_gather, reduce_scatter,
        broadcast) on node-packed ranks leaves each node once per ring, so its bus bandwidth is the node's
        aggregate (nccl-tests' inter-node busbw is compared with all NICs of a node): share = busbw / G; an
        all_to_all's bus bandwidth is per rank, (n-G)/(n-1) of it leaving the node: share = busbw (n-G)/(n-1).
        ``link_op`` names the op whose largest inter-node fit is the link instead (a cost model that already
        charges its other traffic at that fit's network; the rule above if the profile has no such fit).
        (Charging the k-rank steps the flat fit's whole busbw made RS + AG of a buffer over a profile's
        all_reduce-fitted world ~G times faster than that fit's all-reduce of it, the same node traffic.) No
        inter-node fit, a group that is not whole nodes, or an op without a decomposition: InputError."""
        sizes = self.group_sizes(op)
        if sizes and sizes[-1] >= group_size:
            return self.collective(op, group_size)
        G = self.gpus_per_node
        k, rem = divmod(group_size, G)
        have = f"{op} fitted up to group size {sizes[-1]}" if sizes else f"no {op} fit"
        where = self.where
        if op not in ("all_gather", "reduce_scatter", "all_reduce"):
            raise InputError(where, f"has {have}, asked for {group_size} (no two-level estimate for {op})")
        if rem or k < 2 or group_size > self.world_size:
            raise InputError(where, f"has {have}, asked for {group_size}, which is not 2..{self.num_nodes} whole "
                                    f"nodes of {G} GPUs (no two-level estimate)")
        inter = [c for c in self.collectives if c.scope == "inter"]
        if not inter:
            raise InputError(where, f"has {have} and no inter-node fit: a {group_size}-rank {op} ({k} nodes) "
                                    "cannot be estimated (profile the collectives on more than one node)")

        def share_GBps(c: CollectiveFit) -> float:
            """One GPU's share (GB/s) of its node's inter-node bandwidth in fit c (docstring above)."""
            n, g = c.group_size, min(G, c.group_size)
            if c.op == "all_to_all":
                return c.bus_bandwidth_GBps * max(n - g, 1) / max(n - 1, 1)
            return c.bus_bandwidth_GBps / g

        chosen = [c for c in inter if c.op == link_op]
        rule = (f"the largest inter-node {link_op} fit, as asked" if chosen
                else "the slowest of the largest inter-node fits")
        pool = chosen or inter
        top = max(c.group_size for c in pool)
        link = min((c for c in pool if c.group_size == top), key=lambda c: (share_GBps(c), c.op))
        share = share_GBps(link)
        per_ms = share * 1e6  # bytes per ms
        if op == "all_gather":
            intra = [self.collective("all_gather", G)]
            beta = bus_factor("all_gather", k) / per_ms + intra[0].beta_ms_per_byte * k
        elif op == "reduce_scatter":
            intra = [self.collective("reduce_scatter", G)]
            beta = intra[0].beta_ms_per_byte + bus_factor("reduce_scatter", k) / G / per_ms
        else:
            intra = [self.collective("reduce_scatter", G), self.collective("all_gather", G)]
            beta = (intra[0].beta_ms_per_byte + bus_factor("all_reduce", k) / G / per_ms
                    + intra[1].beta_ms_per_byte / G)
        parts = " and ".join(f"the {c.op} fit on {c.group_size} ranks" for c in intra)
        # built from fits within the file's bounds, so finite, but a sum of several may pass a bound a measured fit
        # is held to (a valid profile failed `plan sp` with "beta_ms_per_byte: Input should be less than or equal
        # to 1", naming no file): not validated again
        return CollectiveFit.model_construct(
            op=op, group_size=group_size, scope="inter", alpha_ms=link.alpha_ms + sum(c.alpha_ms for c in intra),
            beta_ms_per_byte=beta, fit_rel_error=0.0,
            source=f"two-level estimate for {k} nodes x {G}: intra-node {parts}, inter-node at the "
                   f"{link.op} fit on {link.group_size} ranks ({share:.3g} GB/s per GPU of its "
                   f"{link.bus_bandwidth_GBps:.3g} GB/s bus bandwidth, alpha {link.alpha_ms:g} ms: {rule}; "
                   f"{link.source})")

    def collective_time_ms(self, op: CollectiveOp, group_size: int, nbytes: float, *,
                           across_nodes: bool = False) -> float:
        """Time (ms) of `op` on `group_size` ranks for `nbytes` per rank (see :class:`CollectiveFit`); 0 for one
        rank."""
        if group_size <= 1:
            return 0.0
        return self.collective(op, group_size, across_nodes=across_nodes).time_ms(nbytes)

    def __eq__(self, other) -> bool:
        """Equal contents: where a profile was read from (``_origin``) is not part of its value."""
        if not isinstance(other, BaseModel):
            return NotImplemented
        return type(self) is type(other) and self.__dict__ == other.__dict__

    @property
    def where(self) -> str:
        """What an error about this profile names: the file it was read from, else "profile 'NAME'"."""
        return self._origin if self._origin is not None else f"profile {self.name!r}"

    def require(self, *fields: str, who: str) -> None:
        """Raise a clear InputError if a field a planner needs is missing (None or empty). A name that is not a
        ClusterProfile field is a ValueError (a typo would otherwise read as 'the profile lacks it')."""
        for f in fields:
            if f not in type(self).model_fields and not isinstance(getattr(type(self), f, None), property):
                raise ValueError(f"require: {f!r} is not a ClusterProfile field")
            if getattr(self, f, None) in (None, [], {}):
                raise InputError(self.where, f"lacks '{f}', which {who} needs")

    def with_nodes(self, num_nodes: int) -> "ClusterProfile":
        """The same per-node hardware on `num_nodes` nodes (world = num_nodes * gpus_per_node).

        Per op, the fits for groups up to the new world are kept; then, if none reaches the new world:
        - a larger fit exists (fewer nodes than the profile): the next larger fit is kept, re-sized to the
          whole world (conservative, as :meth:`collective` takes the next larger fit between sizes);
        - the largest fit crosses nodes (scope 'inter'): it is extended to each power of two up to the new
          world and to the world itself, keeping its alpha and bus bandwidth (nccl-tests' busbw, see
          :func:`bus_factor`: the per-rank beta scales by bus_factor(op, g) / bus_factor(op, n) - x (g-1)/(n-1)
          for all_gather, whose per-rank message is the shard; optimistic where more nodes share the links; the
          copies' `source` says so);
        - the largest fit stays inside a node: nothing is added - an intra-node (NVLink) figure says nothing
          about the links between nodes, so a query for a larger group is an error naming what exists."""
        import re

        if isinstance(num_nodes, bool) or not isinstance(num_nodes, numbers.Integral):  # (2.5 made a profile of
            # 20.0 GPUs that save_profile wrote and load_profile then refused)
            raise InputError("num_nodes", f"must be a whole number of nodes, got {num_nodes!r}")
        num_nodes = int(num_nodes)  # (numpy integers too)
        if num_nodes < 1:
            raise InputError("num_nodes", f"must be >= 1, got {num_nodes}")
        new_world = num_nodes * self.gpus_per_node
        if new_world > MAX_GPUS:
            raise InputError("num_nodes", f"{num_nodes} nodes of {self.gpus_per_node} GPUs is {new_world} GPUs, "
                                          f"more than the {MAX_GPUS} a profile may describe")
        by_op: dict[str, list[CollectiveFit]] = {}
        for c in self.collectives:
            by_op.setdefault(c.op, []).append(c)
        fits: list[CollectiveFit] = []
        for cs in by_op.values():
            cs = sorted(cs, key=lambda c: c.group_size)
            kept = [c for c in cs if c.group_size <= new_world]
            fits.extend(kept)
            if kept and kept[-1].group_size == new_world:
                continue
            larger = [c for c in cs if c.group_size > new_world]
            if larger:
                c = larger[0]
                fits.append(c.model_copy(update={
                    "group_size": new_world, "scope": group_scope(new_world, self.gpus_per_node, new_world),
                    "source": f"{c.source}; the {c.group_size}-rank fit, kept for {new_world} ranks (conservative)"}))
                continue
            largest = kept[-1]
            if largest.scope != "inter":
                continue
            sizes = [1 << k for k in range(largest.group_size.bit_length(), new_world.bit_length())
                     if 1 << k <= new_world]
            n = largest.group_size
            for g in sorted(set(sizes) | {new_world}):
                fits.append(largest.model_copy(update={
                    "group_size": g, "scope": "inter",
                    "beta_ms_per_byte": largest.beta_ms_per_byte * bus_factor(largest.op, g) / bus_factor(largest.op, n),
                    "source": f"{largest.source}; extrapolated from {n} ranks at the same bus bandwidth "
                              "(optimistic)"}))
        if num_nodes == 1:  # one node has no links between nodes: a group measured across them runs inside it
            fits = _one_node_fits(fits)
        name = re.sub(r"@\d+n$", "", self.name)
        out = self.model_copy(update={"num_nodes": num_nodes, "collectives": fits, "name": f"{name}@{num_nodes}n"})
        out._origin = None  # (errors named the file it came from, with fits that file does not hold)
        return out


def _one_node_fits(fits: list[CollectiveFit]) -> list[CollectiveFit]:
    """The fits of a one-node profile: one measured across nodes (scope 'inter') is kept as 'intra', its source
    saying so - one node has no links between nodes, and its groups run inside it."""
    return [c.model_copy(update={"scope": "intra", "source": f"{c.source}; measured across nodes, kept for one "
                                                           "node (pessimistic)"}) if c.scope == "inter" else c
            for c in fits]


def load_profile(name_or_path: str | os.PathLike) -> ClusterProfile:
    """A built-in profile by name (see ``adasched.profiler.builtin``) or a ClusterProfile JSON file."""
    from .builtins import BUILTIN_PROFILES, builtin_profile

    key = str(name_or_path)
    if key in BUILTIN_PROFILES:
        check_builtin_unshadowed(key, "--profile")
        return builtin_profile(key)
    if not os.path.exists(key) and os.sep not in key and not key.endswith(".json"):
        raise InputError("--profile", f"{key!r} is neither a built-in profile ({', '.join(sorted(BUILTIN_PROFILES))}) nor a file")
    prof = load_model(key, ClusterProfile)
    prof._origin = key
    return prof


def check_builtin_unshadowed(name: str, where: str) -> None:
    """Refuse a built-in profile's name that is also a file here: ``show h100-sxm`` read the file while every
    ``--profile h100-sxm`` used the built-in (InputError naming ``where``)."""
    if os.path.isfile(name):
        raise InputError(where, f"{name!r} is both a built-in profile and a file here: pass ./{name} for the file "
                                f"(or run elsewhere for the built-in)")


def save_profile(profile: ClusterProfile, path: str | os.PathLike) -> None:
    atomic_write_json(path, profile)


def more_nodes_hint(prof: "ClusterProfile", gpus: int) -> str:
    """How to get a profile for ``gpus`` GPUs of ``prof``'s nodes, for the error that refuses more GPUs than it
    describes (there is no CLI option for it: the collectives beyond the measured groups are extrapolated, see
    :meth:`ClusterProfile.with_nodes`, which extends only fits measured across nodes). The line is quoted for a POSIX
    shell (a profile path with a quote or a ``$`` in it)."""
    import json  # (double-quoted Python literals: the shell quoting below then rarely escapes anything)
    import shlex

    nodes = -(-gpus // prof.gpus_per_node)
    if nodes * prof.gpus_per_node > MAX_GPUS:
        return f"at most {MAX_GPUS:,} GPUs can be described"
    # what with_nodes makes of it decides (its own rules, not a copy of them here): a fit measured inside one node
    # is not extended, and the line below then made a profile the planners refused for the missing inter-node fits.
    # all_gather / reduce_scatter inside a node are fine: beyond it they are estimated in two levels at the
    # all-to-all's link, as h100-sxm's are
    world = nodes * prof.gpus_per_node
    reach: dict[str, int] = {}
    for c in prof.with_nodes(nodes).collectives or []:
        reach[c.op] = max(reach.get(c.op, 0), c.group_size)
    if not any(r >= world for r in reach.values()) or any(
            reach[op] < world for op in ("all_to_all", "all_reduce") if op in reach):
        return ("its collectives were not measured across nodes, so no larger profile can be derived from it: "
                "run `adasched profile` under torchrun on two or more nodes")
    src = prof.name if prof._origin is None else str(prof._origin)  # (a built-in by name, else its file)
    out = f"profile-{nodes}n.json"
    code = (f"from adasched.profiler.profile import load_profile, save_profile; "
            f"save_profile(load_profile({json.dumps(src)}).with_nodes({nodes}), {json.dumps(out)})")
    return (f"make one of {nodes} such nodes (its collectives extrapolated from the largest measured group) with "
            f"python -c {shlex.quote(code)} and pass --profile {out}")
