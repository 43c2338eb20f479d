"""ClusterProfile: what the cluster is and how fast, as typed, versioned JSON.

Units: times in ms, sizes in bytes, bandwidths in GB/s (1e9 bytes/s), sequence lengths in tokens.
Every fitted model carries its relative fit error and where its numbers come from (`source`).
"""
from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

from .io import InputError, atomic_write_json, load_model

__all__ = [
    "SCHEMA_VERSION",
    "CollectiveOp",
    "CollectiveFit",
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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, allow_inf_nan=False)


class CollectiveFit(_Strict):
    """alpha-beta model of one collective on one group size: time_ms = alpha_ms + beta_ms_per_byte * bytes.

    `bytes` is the message size per rank (the tensor each rank passes to the collective)."""

    op: CollectiveOp
    group_size: PositiveInt
    scope: Literal["intra", "inter"] = Field(description="intra: the group stays inside one node; inter: it crosses nodes")
    alpha_ms: float = Field(ge=0.0)
    beta_ms_per_byte: float = Field(gt=0.0)
    fit_rel_error: float = Field(default=0.0, ge=0.0, description="mean |pred - meas| / meas over the fitted points")
    source: str = "measured"

    def time_ms(self, nbytes: float) -> float:
        return self.alpha_ms + self.beta_ms_per_byte * float(nbytes)

    @property
    def bandwidth_GBps(self) -> float:
        """Asymptotic bandwidth (bytes per rank / time) in GB/s."""
        return 1.0 / (self.beta_ms_per_byte * 1e6)


class AttentionFit(_Strict):
    """Causal attention of one layer, fwd+bwd: time_ms(s) = a1 * s^2 + a2 * s + b (s = sequence length)."""

    a1_ms_per_tok2: float = Field(ge=0.0)
    a2_ms_per_tok: float = Field(ge=0.0)
    b_ms: float = 0.0
    heads: PositiveInt = 32
    head_dim: PositiveInt = 128
    fit_rel_error: float = Field(default=0.0, ge=0.0)
    source: str = "measured"

    def time_ms(self, seqlen: float) -> float:
        return self.a1_ms_per_tok2 * seqlen * seqlen + self.a2_ms_per_tok * seqlen + self.b_ms


class LinearFit(_Strict):
    """Linear layers (QKV, O, MLP) of one transformer layer, fwd+bwd: time_ms(t) = ms_per_token * t + b_ms."""

    ms_per_token: float = Field(gt=0.0)
    b_ms: float = 0.0
    hidden: PositiveInt = 4096
    ffn_hidden: PositiveInt = 11008
    fit_rel_error: float = Field(default=0.0, ge=0.0)
    source: str = "measured"

    def time_ms(self, tokens: float) -> float:
        return self.ms_per_token * tokens + self.b_ms


class ModelCost(_Strict):
    """Whole-model per-sequence cost terms published for a model (FlexSP form):
    compute_ms(s) = a1 * s^2 + a2 * s summed over a group's sequences, plus b1 per step."""

    hidden: PositiveInt
    layers: PositiveInt
    a1_ms_per_tok2: float = Field(ge=0.0)
    a2_ms_per_tok: float = Field(ge=0.0)
    b1_ms: float = Field(ge=0.0)
    act_bytes_per_token: PositiveFloat
    source: str


class DeviceInfo(_Strict):
    kind: Literal["gpu", "cpu"]
    name: str
    memory_bytes: PositiveInt
    count_per_node: PositiveInt = 1
    sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None
    nvlink_links: int | None = None
    pcie_gen: int | None = None
    power_limit_w: float | None = None
    topology: dict[str, Any] | None = Field(default=None, description="GPU-GPU link matrix from NVML where available")
    driver: str | None = None


class ClusterProfile(_Strict):
    SCHEMA_VERSION: ClassVar[int] = SCHEMA_VERSION  # read by load_model
    KIND: ClassVar[str] = "cluster_profile"

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["cluster_profile"] = "cluster_profile"
    name: str
    source: str = Field(description="where the numbers come from (measured on host X / published in paper Y)")
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    num_nodes: PositiveInt = 1
    gpus_per_node: PositiveInt = 1
    device: DeviceInfo
    host: dict[str, Any] = Field(default_factory=dict)
    gemm_tflops: PositiveFloat | None = None
    copy_GBps: PositiveFloat | None = None
    attention: AttentionFit | None = None
    linear: LinearFit | None = None
    collectives: list[CollectiveFit] = Field(default_factory=list)
    model_costs: dict[str, ModelCost] = Field(default_factory=dict)
    raw: dict[str, Any] = Field(default_factory=dict, description="raw measurements the fits came from")

    @model_validator(mode="after")
    def _check(self) -> "ClusterProfile":
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

    def collective(self, op: CollectiveOp, group_size: int) -> CollectiveFit:
        """The fit for `op` on `group_size` ranks. A size between fitted sizes uses the next larger fit
        (conservative); a size outside the fitted range is an error naming what exists."""
        if group_size < 1:
            raise InputError("group_size", f"must be >= 1, got {group_size}")
        fits = sorted((c for c in self.collectives if c.op == op), key=lambda c: c.group_size)
        if not fits:
            raise InputError(f"profile {self.name!r}", f"has no {op} fit (a planner needs collectives.{op})")
        for c in fits:
            if c.group_size >= group_size:
                return c
        raise InputError(
            f"profile {self.name!r}",
            f"{op} fitted up to group size {fits[-1].group_size}, asked for {group_size}",
        )

    def collective_time_ms(self, op: CollectiveOp, group_size: int, nbytes: float) -> float:
        if group_size <= 1:
            return 0.0
        return self.collective(op, group_size).time_ms(nbytes)

    def require(self, *fields: str, who: str) -> None:
        """Raise a clear InputError if a field a planner needs is missing."""
        for f in fields:
            if getattr(self, f, None) in (None, [], {}):
                raise InputError(f"profile {self.name!r}", f"lacks '{f}', which {who} needs")

    def with_nodes(self, num_nodes: int) -> "ClusterProfile":
        """The same per-node hardware on `num_nodes` nodes. Inter-node collective fits are extended to the
        new group sizes by keeping the largest fitted group's bandwidth (documented extrapolation)."""
        if num_nodes < 1:
            raise InputError("num_nodes", f"must be >= 1, got {num_nodes}")
        new_world = num_nodes * self.gpus_per_node
        fits: list[CollectiveFit] = []
        by_op: dict[str, list[CollectiveFit]] = {}
        for c in self.collectives:
            by_op.setdefault(c.op, []).append(c)
        for op, cs in by_op.items():
            cs = sorted(cs, key=lambda c: c.group_size)
            kept = [c for c in cs if c.group_size <= new_world]
            fits.extend(kept)
            largest = cs[-1]
            g = largest.group_size * 2
            while g <= new_world:
                fits.append(
                    largest.model_copy(
                        update={"group_size": g, "source": f"{largest.source}; extrapolated from {largest.group_size}"}
                    )
                )
                g *= 2
        return self.model_copy(update={"num_nodes": num_nodes, "collectives": fits, "name": f"{self.name}@{num_nodes}n"})


def load_profile(name_or_path: str | os.PathLike) -> ClusterProfile:
    """A built-in profile by name (see ``adasched.profiler.builtin``) or a ClusterProfile JSON file."""
    from .builtins import BUILTIN_PROFILES, builtin_profile

    key = str(name_or_path)
    if key in BUILTIN_PROFILES:
        return builtin_profile(key)
    if not os.path.exists(key) and os.sep not in key and not key.endswith(".json"):
        raise InputError("--profile", f"{key!r} is neither a built-in profile ({', '.join(sorted(BUILTIN_PROFILES))}) nor a file")
    return load_model(key, ClusterProfile)


def save_profile(profile: ClusterProfile, path: str | os.PathLike) -> None:
    atomic_write_json(path, profile)

