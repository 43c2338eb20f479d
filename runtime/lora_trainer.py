"""Multi-adapter LoRA trainer that executes a LoRA plan (adasched.planner.lorafusion.plan.LoRAPlan).

Every microbatch of the plan packs samples of one or more jobs; each projection runs the fused multi-LoRA
kernel (``adasched.kernels.lora.multi_lora_linear``; ``fused=False`` selects the torch reference) with one
segment per job. The loss of microbatch i is

    sum over jobs j in i of  sum_{target tokens of j in i} CE / (target tokens of j's whole global batch)

so after the last microbatch of (job, global batch) the job's gradients equal those of plain training on that
global batch as one batch (mean token loss); that job's optimizer steps right then and its gradients are
zeroed. Other jobs keep flowing: no pipeline flush between jobs, no flush between global batches beyond the
plan's no-op microbatches (the dependency rule guarantees the step happened before the job's next global
batch enters a stage).

Execution: :func:`train_plan` runs all layers in one process; :func:`train_plan_pipeline` splits the layers
over the ranks of a process group (gloo on CPU) and runs a 1F1B schedule with send/recv of activations and
their gradients. Both give the same losses and adapters. :func:`save_adapters` writes each job's adapter in
PEFT's format (adapter_model.safetensors + adapter_config.json).
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from adasched.profiler.io import InputError, atomic_write_text

from .lora_model import LoRAAdapter, TinyCausalLM, save_peft_adapter, seed64

__all__ = [
    "SyntheticLoRAData",
    "PackedMicrobatch",
    "TrainResult",
    "build_adapters",
    "pack_microbatch",
    "train_plan",
    "train_plan_pipeline",
    "one_f_one_b_order",
    "stage_layers",
    "save_adapters",
    "check_plan",
    "gather_adapter_states",
]


# ---- data -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticLoRAData:
    """Deterministic, learnable token streams: job j's samples follow t[k+1] = (a_j * t[k] + c_j) mod V from a
    random start token, so each adapter has its own rule to learn. Same (seed, job, sample) -> same tokens."""

    vocab_size: int
    seed: int = 0

    def tokens(self, job: int, sample: int, length: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed64(self.seed * 1_000_003 + sample))
        t0 = int(torch.randint(0, self.vocab_size, (1,), generator=g))
        a, c = 2 * job + 3, 5 * job + 1
        out = [t0]
        for _ in range(length - 1):
            out.append((a * out[-1] + c) % self.vocab_size)
        return torch.tensor(out, dtype=torch.long)


@dataclass
class PackedMicrobatch:
    index: int
    seq_lens: list[int]
    tokens: torch.Tensor
    """[T] token ids, samples laid end to end"""
    targets: torch.Tensor
    """[T] next token within the same sample; -100 at each sample's last token"""
    weights: torch.Tensor
    """[T] 1 / (target tokens of the row's (job, global batch)); 0 where no target"""
    job_of_row: torch.Tensor
    segments: list[tuple[int, int, int]]
    """(job, row_start, row_end), one per job present"""
    global_batch: dict[int, int]


def _target_counts(plan) -> dict[tuple[int, int], int]:
    out: dict[tuple[int, int], int] = {}
    for (j, g), ids in plan.batches().items():
        out[(j, g)] = max(1, sum(plan.lengths[s] - 1 for s in ids))
    return out


def pack_microbatch(plan, i: int, data: SyntheticLoRAData, counts: dict[tuple[int, int], int]) -> PackedMicrobatch | None:
    """Tokens, targets and segment table of microbatch ``i`` (None for a no-op)."""
    mb = plan.microbatches[i]
    if not mb.segments:
        return None
    toks, tgts, wts, jobs, lens, segs = [], [], [], [], [], []
    row = 0
    gb: dict[int, int] = {}
    for seg in mb.segments:
        start = row
        gb[seg.job] = seg.global_batch
        w = 1.0 / counts[(seg.job, seg.global_batch)]
        for s in seg.samples:
            n = plan.lengths[s]
            t = data.tokens(seg.job, s, n)
            toks.append(t)
            tg = torch.full((n,), -100, dtype=torch.long)
            tg[:-1] = t[1:]
            tgts.append(tg)
            ww = torch.full((n,), w)
            ww[-1] = 0.0
            wts.append(ww)
            jobs.append(torch.full((n,), seg.job, dtype=torch.long))
            lens.append(n)
            row += n
        segs.append((seg.job, start, row))
    return PackedMicrobatch(i, lens, torch.cat(toks), torch.cat(tgts), torch.cat(wts), torch.cat(jobs), segs, gb)


# ---- adapters and projections -----------------------------------------------------------------------------
def build_adapters(model: TinyCausalLM, plan, *, seed: int = 0, init_b: str = "zeros") -> list[LoRAAdapter]:
    """One LoRAAdapter per job of the plan, seeded per job (identical in every process)."""
    return [LoRAAdapter(model, job.adapter, seed=seed * 7919 + j, init_b=init_b) for j, job in enumerate(plan.jobs)]


def _dropout_seed(base: int, mb_index: int, path: str) -> int:
    return (base * 1_000_003 + mb_index * 104_729 + zlib.crc32(path.encode())) % (2 ** 31 - 1)


def _make_proj(mb: PackedMicrobatch, adapters: Sequence[LoRAAdapter], fused: bool, seed: int):
    from adasched.kernels.lora import LoRAAdapterWeights, multi_lora_linear, multi_lora_linear_reference

    fn = multi_lora_linear if fused else multi_lora_linear_reference

    def proj(path: str, module, x: torch.Tensor) -> torch.Tensor:
        ads, segs = [], []
        for job, s, e in mb.segments:
            ad = adapters[job]
            if ad.has(path):
                a, b = ad.pair(path)
                segs.append((len(ads), s, e))
                ads.append(LoRAAdapterWeights(a, b, ad.scale, ad.spec.dropout))
        if not ads:
            return module(x)
        return fn(x, module.weight, ads, segs, seed=_dropout_seed(seed, mb.index, path))

    return proj


# ---- schedule helpers -----------------------------------------------------------------------------------
def stage_layers(num_layers: int, stages: int, stage: int) -> tuple[int, int]:
    """Contiguous, balanced layer range [start, end) of ``stage``."""
    if not 0 <= stage < stages or stages > num_layers:
        raise ValueError(f"stage {stage} of {stages} over {num_layers} layers: need 0 <= stage < stages <= layers")
    return (num_layers * stage) // stages, (num_layers * (stage + 1)) // stages


def one_f_one_b_order(M: int, stages: int, stage: int) -> list[tuple[str, int]]:
    """1F1B order of ('F'|'B', microbatch) on one stage: S-s-1 warm-up forwards, then F/B pairs, then drain."""
    warm = min(stages - stage - 1, M)
    order = [("F", i) for i in range(warm)]
    for i in range(M - warm):
        order += [("F", warm + i), ("B", i)]
    return order + [("B", i) for i in range(M - warm, M)]


def _last_microbatch(plan) -> dict[int, list[int]]:
    """microbatch index -> jobs whose current global batch ends there (their optimizer steps after its backward)."""
    last: dict[tuple[int, int], int] = {}
    for i, mb in enumerate(plan.microbatches):
        for seg in mb.segments:
            last[(seg.job, seg.global_batch)] = i
    out: dict[int, list[int]] = {}
    for (j, _), i in last.items():
        out.setdefault(i, []).append(j)
    return out


def _optimizers(adapters: Sequence[LoRAAdapter], plan, layers: tuple[int, int]) -> list[torch.optim.Optimizer | None]:
    """Per job: AdamW over its parameters in ``layers`` (weight decay 0), or None when it has none there."""
    out = []
    for ad, job in zip(adapters, plan.jobs):
        params = []
        for p in ad.paths:
            li = int(p.split(".")[1])
            if layers[0] <= li < layers[1]:
                params += list(ad.pair(p))
        out.append(torch.optim.AdamW(params, lr=job.lr, weight_decay=0.0) if params else None)
    return out


def check_plan(plan, model: TinyCausalLM, stages: int) -> None:
    """InputError unless the plan fits the model (sample lengths) and ``stages`` pipeline ranks (dependency rule)."""
    if max(plan.lengths) > model.cfg.max_positions:
        raise InputError("plan", f"longest sample {max(plan.lengths)} tokens > model max_positions {model.cfg.max_positions}")
    bad = plan.dependency_violations(stages)
    if bad:
        a, g, f, l = bad[0]
        raise InputError("plan", f"made for {plan.stages} stages: job {plan.jobs[a].name!r} global batch {g} starts at "
                                 f"microbatch {f}, fewer than {stages} after {l} (re-plan with stages >= {stages})")


@dataclass
class TrainResult:
    losses: dict[tuple[int, int], float] = field(default_factory=dict)
    """(job, global batch) -> mean token loss of that global batch (before its optimizer step)"""
    microbatch_losses: list[float] = field(default_factory=list)
    """per executed microbatch, the loss it backpropagated: the sum over its jobs of (their tokens' CE sum here /
    their global batch's target tokens) - each job's share of its global-batch mean, not a mean of this microbatch"""
    steps: dict[int, int] = field(default_factory=dict)
    """job -> optimizer steps taken"""

    def by_job(self, plan) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for (j, g), v in sorted(self.losses.items()):
            out.setdefault(plan.jobs[j].name, []).append(v)
        return out


def _loss(logits: torch.Tensor, mb: PackedMicrobatch, sums: dict[tuple[int, int], float]) -> torch.Tensor:
    ce = F.cross_entropy(logits, mb.targets, ignore_index=-100, reduction="none")
    for job, s, e in mb.segments:
        key = (job, mb.global_batch[job])
        sums[key] = sums.get(key, 0.0) + float((ce[s:e] * mb.weights[s:e]).sum().detach())
    return (ce * mb.weights).sum()


# ---- single process -------------------------------------------------------------------------------------
def train_plan(model: TinyCausalLM, adapters: Sequence[LoRAAdapter], plan, data: SyntheticLoRAData, *,
               fused: bool = True, seed: int = 0) -> TrainResult:
    """Execute every microbatch of ``plan`` in order on all layers (one process)."""
    check_plan(plan, model, 1)
    counts = _target_counts(plan)
    opts = _optimizers(adapters, plan, (0, model.cfg.layers))
    steps_at = _last_microbatch(plan)
    res = TrainResult()
    for i in range(len(plan.microbatches)):
        mb = pack_microbatch(plan, i, data, counts)
        if mb is None:
            continue
        proj = _make_proj(mb, adapters, fused, seed)
        logits = model.forward_packed(mb.seq_lens, proj, tokens=mb.tokens)
        loss = _loss(logits, mb, res.losses)
        loss.backward()
        res.microbatch_losses.append(float(loss.detach()))
        for j in steps_at.get(i, ()):
            opts[j].step()
            opts[j].zero_grad(set_to_none=True)
            res.steps[j] = res.steps.get(j, 0) + 1
    return res


# ---- pipeline over a process group ------------------------------------------------------------------------
def train_plan_pipeline(model: TinyCausalLM, adapters: Sequence[LoRAAdapter], plan, data: SyntheticLoRAData, *,
                        group=None, fused: bool = True, seed: int = 0) -> TrainResult:
    """1F1B over the ranks of ``group`` (stage = rank): rank s holds layers ``stage_layers(L, S, s)``, the
    embedding on rank 0, the final norm + head and the loss on the last rank. Activations go forward and their
    gradients backward with point-to-point send/recv; no-op microbatches are skipped by every rank. Each rank
    steps a job's optimizer (its own layers' parameters) after the backward of that job's last microbatch of
    the global batch. Returns the losses on the last rank (empty elsewhere)."""
    import torch.distributed as dist

    S, s = dist.get_world_size(group), dist.get_rank(group)
    check_plan(plan, model, S)
    peer = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
    layers = stage_layers(model.cfg.layers, S, s)
    first, last = s == 0, s == S - 1
    counts = _target_counts(plan)
    opts = _optimizers(adapters, plan, layers)
    steps_at = _last_microbatch(plan)
    res = TrainResult()
    H = model.cfg.hidden
    live: dict[int, tuple] = {}
    pending: list = []
    M = len(plan.microbatches)
    for op, i in one_f_one_b_order(M, S, s):
        mb = pack_microbatch(plan, i, data, counts)
        if mb is None:
            continue
        T = len(mb.tokens)
        if op == "F":
            proj = _make_proj(mb, adapters, fused, seed)
            if first:
                h_in = None
                out = model.forward_packed(mb.seq_lens, proj, tokens=mb.tokens, layers=layers, head=last)
            else:
                h_in = torch.empty(T, H)
                dist.recv(h_in, src=peer(s - 1), group=group, tag=2 * i)
                h_in.requires_grad_(True)
                out = model.forward_packed(mb.seq_lens, proj, hidden=h_in, layers=layers, head=last)
            if last:
                out = _loss(out, mb, res.losses)
                res.microbatch_losses.append(float(out.detach()))
            else:
                send = out.detach().contiguous()
                pending.append((dist.isend(send, dst=peer(s + 1), group=group, tag=2 * i), send))
            live[i] = (h_in, out)
        else:
            h_in, out = live.pop(i)
            if last:
                out.backward()
            else:
                grad = torch.empty(T, H)
                dist.recv(grad, src=peer(s + 1), group=group, tag=2 * i + 1)
                out.backward(grad)
            if not first:
                g = h_in.grad.contiguous()
                pending.append((dist.isend(g, dst=peer(s - 1), group=group, tag=2 * i + 1), g))
            for j in steps_at.get(i, ()):
                if opts[j] is not None:
                    opts[j].step()
                    opts[j].zero_grad(set_to_none=True)
                res.steps[j] = res.steps.get(j, 0) + 1
        pending = [(w, t) for w, t in pending if not w.is_completed()]
    for w, _ in pending:
        w.wait()
    return res


def gather_adapter_states(adapters: Sequence[LoRAAdapter], model: TinyCausalLM, group=None) -> list[dict] | None:
    """Collect every job's PEFT state dict from the stages (each rank owns its layers' matrices) on rank 0."""
    import torch.distributed as dist

    S, s = dist.get_world_size(group), dist.get_rank(group)
    lo, hi = stage_layers(model.cfg.layers, S, s)
    mine = [ad.peft_state_dict([p for p in ad.paths if lo <= int(p.split(".")[1]) < hi]) for ad in adapters]
    got = [None] * S if s == 0 else None
    dist.gather_object(mine, got, dst=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    if s != 0:
        return None
    merged = [dict() for _ in adapters]
    for part in got:
        for j, sd in enumerate(part):
            merged[j].update(sd)
    return merged


def save_adapters(out_dir: str | Path, plan, adapters: Sequence[LoRAAdapter], states: Sequence[dict] | None = None,
                  result: TrainResult | None = None) -> list[Path]:
    """Write out_dir/<job name>/{adapter_model.safetensors, adapter_config.json} per job (PEFT's layout) and,
    with ``result``, out_dir/losses.json."""
    out = Path(out_dir)
    paths = []
    for j, (ad, job) in enumerate(zip(adapters, plan.jobs)):
        sd = states[j] if states is not None else ad.peft_state_dict()
        paths.append(save_peft_adapter(out / job.name, ad.peft_config(), sd))
    if result is not None:
        atomic_write_text(out / "losses.json", json.dumps(
            {"per_global_batch": result.by_job(plan), "microbatch": result.microbatch_losses,
             "optimizer_steps": {plan.jobs[j].name: n for j, n in sorted(result.steps.items())}}, indent=1) + "\n")
    return paths
