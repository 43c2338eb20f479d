"""From a Twill schedule to Triton knobs, and the GEMM main-loop graph for a given tile shape.

Mapping (documented assumptions, checked on a GPU by launch/gemm_check.py):

- ``num_stages``: the deepest shared-memory buffer among the variable-latency (TMA) loads, i.e. how many
  copies of a loaded tile are live at once = ceil(lifetime / I), at least 2 (a load whose latency is not
  known at compile time always gets a second buffer so its producer can run ahead); the schedule's stage
  count when the graph has no loads;
  plus one slack buffer, because the schedule placed the variable-latency load at its nominal latency and a
  late one would stall the MMA otherwise; capped by what the shared memory of one CTA holds ((capacity - the other ops' ``smem`` x buffers) // S
  with S KiB per stage, the loads' ``smem``), even when that is a single stage. On an H200 (2026-11-28, three sweeps, BENCHMARKS.md ``twill``)
  the 128x256x64 tile ran best at 4 stages (schedule depth 3) every time; on 128x128x64, 4 stages with 8
  warps was within 3.6 % of the best in every sweep and the earlier choice (3 stages, 4 warps, two CTAs per
  SM) within 7 % - they swap places from run to run, so the plain GEMM does not decide between them;
- ``num_warps``: with warp specialization 4 per register-holding consumer warp group, rounded up to a power of two
  (Triton takes no other: 12 is refused); groups without live values (producers, the MMA-issue group - one
  thread issues tcgen05 on Blackwell) become Triton's worker partitions (FA4: 8 default warps for its two
  softmax groups; it was 16, counting the MMA-issue group and rounding 12 up). Without it Triton spreads
  the tile's rows over all warps, one warpgroup per 64-row MMA slice, so every register-holding op gets a
  warpgroup of its own: 4 x max(consumer groups, register-holding ops), at most 8 (two consumer
  warpgroups, as CUTLASS's cooperative Hopper kernels). What decides it on the H200 is the fused LoRA GEMM
  on the 128x128x64 tile (two m64 MMA slices): 1.7-1.9x faster on 8 warps than on 4, where its masked dX
  epilogue spilled (kernel_report; since split per column half it compiles without spills on 4 warps too - not
  re-timed, so the mapping stands); the plain GEMM is within run-to-run noise either way (above);
- ``warp_specialize``: True only where the machine's Triton supports it (Blackwell) and the schedule has a
  producer group; on Hopper it is False (upstream may ignore or reject it there);
- ``maxnreg``: only with ``warp_specialize``. Triton reads it as the registers per thread of *every* warp at launch
  - the ``num_warps`` default warps plus the worker warps its warp specialization adds (the producer and
  MMA-issue partitions, padded to whole warpgroups: one warpgroup for up to four such groups) - and then moves
  registers from the workers to the default warps with setmaxnreg. The CTA must fit the register file
  (``maxnreg x 32 x all warps <= regs_total x 128``), so maxnreg is that bound rounded down to 8 (Triton's own
  choice when none is given: ``python -m adasched.launch.kernel_report --arch 100 --only gemm --json r.json``, an
  offline sm_100 compile, gives the TMA 128x256x64 and 128x128x64 GEMMs at 8 warps maxnreg 168 = 65,536 / (12
  warps x 32), rounded down to 8 - one worker warpgroup, as assumed here; the pointer-load variants get 128, as
  many worker warps as default ones (two warpgroups at 8 warps), so these knobs fit a TMA main loop, the one the
  graph models, and would over-ask on pointer loads: ``GemmConfig.from_knobs`` therefore asks for TMA loads with
  warp-specialized knobs, and a launch whose operands cannot take TMA leaves maxnreg to Triton,
  ``kernels.gemm.launch_maxnreg`` - not launched on a Blackwell GPU), capped by the per-group limit. This used
  to be the neediest group's
  registers (232 for FA4 over 16 + 4 warps, 240 for the 128x256 GEMM over 8 + 4: 148,480 and 92,160 registers,
  more than the 65,536 a CTA may hold - a launch Triton would refuse; found by reading Triton's
  AllocateWarpGroups, not on a Blackwell GPU). What the default (consumer) warps end up with is estimated with
  the workers at the machine's base registers; when the neediest register-holding group needs more, the knobs'
  ``note`` says so (the schedule's split then does not map onto Triton's one default partition). Without warp
  specialization there is no split to make and the knob is left to the compiler (None): on an H200
  (2026-11-28, ``launch/device_check.py``) capping a non-specialized Triton GEMM at 240 registers cost 4-13 %
  (128x256x64 s3 w8: 611-638 TFLOP/s with the cap, 664-679 without).
"""
from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

from .graph import Edge, Graph, Machine, Op

__all__ = ["TritonKnobs", "derive_knobs", "gemm_graph", "value_lifetimes", "buffer_depths"]


class TritonKnobs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_stages: int = Field(ge=1)
    num_warps: int = Field(ge=1)
    warp_specialize: bool
    maxnreg: int | None = Field(default=None, ge=24, le=255)
    #: what the knobs cannot give the schedule (a register-holding group needing more registers than Triton's
    #: launch leaves the default warps), or None
    note: str | None = None

    def as_launch_kwargs(self) -> dict:
        out = {"num_stages": self.num_stages, "num_warps": self.num_warps}
        if self.maxnreg is not None:
            out["maxnreg"] = self.maxnreg
        return out


def value_lifetimes(graph: Graph, ii: int, times: dict[str, int]) -> dict[str, int]:
    """Cycles each op's result stays live: until its last (non-self) consumer has finished."""
    length = {o.name: o.length for o in graph.ops}
    life = dict(length)
    for src, dst, d in graph.value_uses():  # a self-loop: in place, d - 1 later instances
        end = times[dst] + ii * d + length[dst]
        life[src] = max(life[src], end - times[src])
    return life


def buffer_depths(graph: Graph, ii: int, times: dict[str, int]) -> dict[str, int]:
    """Live copies (buffer depth) of every op result: ceil(lifetime / I)."""
    return {v: max(1, -(-lv // ii)) for v, lv in value_lifetimes(graph, ii, times).items()}


#: warps of one CTA: 1024 threads (CUDA's limit; Triton refuses a launch past it)
MAX_CTA_WARPS = 32


def derive_knobs(graph: Graph, machine: Machine, ii: int, times: dict[str, int], groups: dict[str, int]) -> TritonKnobs:
    depth = buffer_depths(graph, ii, times)
    loads = [o.name for o in graph.ops if o.variable_latency and (o.smem or 0) > 0]
    stages = max(times.values()) // ii + 1
    num_stages = max([max(2, depth[v]) for v in loads], default=stages)
    stage_kib = sum(o.smem for o in graph.ops if o.name in loads)
    if loads:
        num_stages += 1  # slack for the variable-latency load
        if stage_kib > 0:
            # never more stages than the CTA's shared memory holds, even below the two a load wants: a
            # machine that fits one stage got num_stages=2, more shared memory than it has
            # the other ops' shared memory (their buffers) stays resident beside the load stages
            fixed_kib = sum((o.smem or 0) * depth[o.name] for o in graph.ops if o.name not in loads)
            num_stages = max(1, min(num_stages, (machine.smem_capacity - fixed_kib) // stage_kib))
    notes = []
    load_depth = max([depth[v] for v in loads], default=0)
    if num_stages < load_depth:  # (the cap above; before, said nowhere)
        notes.append(f"shared memory holds {num_stages} stage(s) of the loads ({stage_kib} KiB each), fewer than "
                     f"the schedule's buffer depth {load_depth}: Triton cannot pipeline the loads as scheduled, so "
                     f"I = {ii} is not realised")
    producer = {groups[o.name] for o in graph.ops if o.variable_latency}
    consumer = {groups[o.name] for o in graph.ops} - producer
    ws = bool(machine.warp_specialize and producer and consumer)
    if not ws:
        holders = sum(1 for o in graph.ops if (o.regs or 0) > 0)
        return TritonKnobs(num_stages=max(1, num_stages), num_warps=min(8, 4 * max(1, len(consumer), holders)),
                           warp_specialize=False, note="; ".join(notes) or None)
    holding = {groups[o.name] for o in graph.ops if (o.regs or 0) > 0} or consumer
    # 4 warps per register-holding consumer group, rounded up to a power of two (Triton takes no other: 12 is
    # refused); the groups without live values (producers, MMA issue - one thread on Blackwell) are Triton's
    # worker partitions, not default warps (fa4 counted its MMA-issue group: 16 default warps, registers for 112
    # per thread where the softmax groups need 216)
    num_warps = 1 << (4 * max(1, len(holding & consumer)) - 1).bit_length()
    workers = len(set(groups.values()) - holding)
    worker_warps = 4 * max(1, -(-workers // 4))
    if num_warps + worker_warps > MAX_CTA_WARPS:  # a CTA has at most 1024 threads: Triton refuses more
        capped = 1 << ((MAX_CTA_WARPS - worker_warps).bit_length() - 1)
        notes.append(f"{len(holding & consumer)} register-holding consumer groups want {num_warps} default warps "
                     f"beside {worker_warps} worker warps, more than a CTA's {MAX_CTA_WARPS} (1024 threads): "
                     f"num_warps capped at {capped}, so groups share warps")
        num_warps = capped
    file_regs = machine.regs_total * machine.threads_per_group  # registers of one CTA's file
    top = min(machine.regs_per_group_max, 255) // 8 * 8
    maxnreg = max(24, min(top, file_regs // (32 * (num_warps + worker_warps)) // 8 * 8))
    # the default warps' share once the workers drop to their base (Triton's setmaxnreg split, estimated)
    base = -(-machine.group_base_regs // 8) * 8
    default_regs = min(256, (maxnreg * (num_warps + worker_warps) - min(base, maxnreg) * worker_warps)
                       // num_warps // 8 * 8)
    need = max([machine.group_base_regs + sum((o.regs or 0) * depth[o.name] for o in graph.ops if groups[o.name] == q)
                for q in holding] + [0])
    if need > default_regs:
        notes.append(f"a warp group needs {need} registers per thread; Triton's launch (maxnreg {maxnreg} over "
                     f"{num_warps} + {worker_warps} worker warps) leaves the default warps about {default_regs}: "
                     f"expect spills unless the groups get partitions of their own")
    return TritonKnobs(num_stages=max(1, num_stages), num_warps=num_warps, warp_specialize=True, maxnreg=maxnreg,
                       note="; ".join(notes) or None)


def gemm_graph(machine: Machine, block_m: int, block_n: int, block_k: int, dtype_bytes: int = 2) -> Graph:
    """The TMA + tensor-core GEMM main loop for one tile shape, in the machine's normalised cycles.

    One TMA op loads the A (block_m x block_k) and B (block_k x block_n) tiles on one barrier (variable
    latency); the MMA is split into block_m / 64 row parts (one m64 WGMMA chain each) whose fp32 accumulators
    (64 * block_n / 128 registers per thread) stay in place across iterations. Costs: hardware cycles from
    ``machine.raw_cycles`` and ``tensor_flops_per_cycle`` divided by the machine's cycle unit
    (``cycle_ns * clock_ghz``), rounded, never below 1."""
    if block_m % 64 or block_m <= 0 or block_n <= 0 or block_k <= 0:
        raise ValueError(f"block_m must be a positive multiple of 64 (got {block_m}); block_n, block_k > 0")
    unit = machine.cycle_ns * machine.clock_ghz  # SM cycles per normalised cycle
    if machine.tensor_flops_per_cycle <= 0:
        raise ValueError(f"machine {machine.name!r}: tensor_flops_per_cycle is not set")

    def norm(cycles: float) -> int:
        return max(1, math.floor(cycles / unit + 0.5))

    parts = block_m // 64
    mma = norm(2 * 64 * block_n * block_k / machine.tensor_flops_per_cycle)
    lat_tma = norm(machine.raw_cycles.get("tma_latency", 1536))
    smem_kib = max(1, math.ceil((block_m * block_k + block_k * block_n) * dtype_bytes / 1024))
    ops = [Op(name="L", reserve={"TMA": [1]}, variable_latency=True, smem=smem_kib, category="tma")]
    edges = []
    for p in range(parts):
        ops.append(Op(name=f"M{p}", reserve={"TC": [1] * mma}, regs=64 * block_n // 128, category="mma"))
        edges.append(Edge(**{"from": "L", "to": f"M{p}", "delay": lat_tma, "distance": 0}))
        # accumulating MMAs chain back to back in place (the MMA latency matters only to the epilogue)
        edges.append(Edge(**{"from": f"M{p}", "to": f"M{p}", "delay": mma, "distance": 1}))
    return Graph(name=f"gemm-{block_m}x{block_n}x{block_k}", machine=machine.name,
                 description=f"TMA + tensor-core GEMM main loop, tile {block_m}x{block_n}x{block_k}, "
                             f"{dtype_bytes}-byte inputs ({smem_kib} KiB per stage)", ops=ops, edges=edges)
