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

Checkpoints. The unit of progress ("step") is a position in the plan's microbatch sequence: step k = the first k
microbatches of the plan (no-op ones included) are done, forward and backward, on every stage, and every optimizer
step they end has been taken. With ``checkpoint_every=N`` the trainers call ``on_checkpoint(k)`` at every k that is
a multiple of N (and at the end); the pipeline runs 1F1B on the chunks between those points and drains at each, so
no microbatch is in flight there (the drains cost pipeline bubbles, not numerics: each microbatch's forward sees
the same adapter weights and the backwards accumulate in the same order, so a checkpointed run equals an
uninterrupted one bit for bit). :class:`LoRATrainerState` (one per rank) is what decides the rest of a run
from such a point and is saved by :mod:`adasched.runtime.checkpoint`:

- the cursor (steps done);
- every job's LoRA A/B matrices (the stage's layers are the trained ones; the others keep their seeded init);
- the gradients accumulated so far of every job whose current global batch is not finished (``.grad``);
- each job's AdamW state (moments, step count) for the stage's layers (None where the job has none there);
- the TrainResult: loss sums of the (job, global batch) pairs seen so far, finished or partly accumulated, and the
  per-microbatch losses (on the last stage; empty elsewhere), and the optimizer-step counts (on every stage).

The data (:class:`SyntheticLoRAData`, keyed by job name and the sample's index within its job) and the dropout
masks (Philox, seeded by run seed, microbatch index and module path, over the packed rows) are functions of the
position, so they need no state; the launcher saves the torch / Python RNG anyway
(:class:`~adasched.runtime.checkpoint.RNGState`). A save of another number of stages is merged into each new stage's
state by :func:`reshard_trainer_blobs` (the launcher's resharded resume).
"""
from __future__ import annotations

import bisect
import io
import itertools
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from adasched.planner.lorafusion.costmodel import stage_layers
from adasched.profiler.io import InputError, atomic_write_text

from .lora_model import ADAPTER_FILES, LoRAAdapter, TinyCausalLM, save_peft_adapter, seed64

__all__ = [
    "SyntheticLoRAData",
    "job_starts",
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
    "LoRATrainerState",
    "trainer_state",
    "checkpoint_points",
    "reshard_trainer_blobs",
]


# ---- data -----------------------------------------------------------------------------------------------
def _name_key(name: str) -> int:
    """A job's name as a number (CRC-32): what its data and its adapter's init are keyed by, so that (without
    dropout: the masks are drawn over the packed rows) a job trains the same wherever it stands in the jobs file and
    whichever jobs share its microbatches."""
    return zlib.crc32(name.encode())


@dataclass(frozen=True)
class SyntheticLoRAData:
    """Deterministic, learnable token streams: a job's samples follow t[k+1] = (a * t[k] + c) mod V from a random
    start token, with (a, c) from the job's name, so each adapter has its own rule to learn. Same (seed, job name,
    sample's index within its job) -> same tokens: a job's data does not depend on the jobs before it in the file
    (keyed by the job's position and the plan-wide sample id, job B alone and job B after job A differed)."""

    vocab_size: int
    seed: int = 0

    def tokens(self, job: str, sample: int, length: int) -> torch.Tensor:
        """The tokens of sample ``sample`` (its index within job ``job``, by name) of ``length`` tokens."""
        key = _name_key(job)
        g = torch.Generator().manual_seed(seed64(self.seed * 1_000_003 + key * 104_729 + sample))
        t0 = int(torch.randint(0, self.vocab_size, (1,), generator=g))
        a, c = 2 * (key % 1021) + 3, 5 * (key // 1021 % 1021) + 1
        out = [t0]
        for _ in range(length - 1):
            out.append((a * out[-1] + c) % self.vocab_size)
        return torch.tensor(out, dtype=torch.long)

    def sample_tokens(self, plan, sample: int) -> torch.Tensor:
        """The tokens of the plan's sample ``sample`` (a plan-wide sample id)."""
        starts = job_starts(plan)
        job = bisect.bisect_right(starts, sample) - 1
        return self.tokens(plan.jobs[job].name, sample - starts[job], plan.lengths[sample])


def job_starts(plan) -> list[int]:
    """The plan-wide id of each job's first sample: each job's samples are contiguous, in job order
    (``LoRAPlan.expected_batches``), so a sample's index within its job is its id less its job's start."""
    return list(itertools.accumulate((job.global_batch_size * job.global_batches for job in plan.jobs[:-1]),
                                     initial=0))


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


def _target_tokens(plan) -> dict[tuple[int, int], int]:
    """(job, global batch) -> its target tokens (a sample of n tokens predicts n - 1; 0 = nothing to predict)."""
    return {key: sum(plan.lengths[s] - 1 for s in ids) for key, ids in plan.batches().items()}


def _target_counts(plan) -> dict[tuple[int, int], int]:
    """The divisor of each (job, global batch)'s token losses: its target tokens, at least 1."""
    return {key: max(1, n) for key, n in _target_tokens(plan).items()}


def pack_microbatch(plan, i: int, data: SyntheticLoRAData, counts: dict[tuple[int, int], int]) -> PackedMicrobatch | None:
    """Tokens, targets and segment table of microbatch ``i`` (None for a no-op)."""
    mb = plan.microbatches[i]
    if not mb.segments:
        return None
    toks, tgts, wts, jobs, lens, segs = [], [], [], [], [], []
    starts = job_starts(plan)
    row = 0
    gb: dict[int, int] = {}
    for seg in mb.segments:
        start = row
        gb[seg.job] = seg.global_batch
        w = 1.0 / counts[(seg.job, seg.global_batch)]
        for s in seg.samples:
            n = plan.lengths[s]
            t = data.tokens(plan.jobs[seg.job].name, s - starts[seg.job], n)
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
    """One LoRAAdapter per job of the plan, seeded by ``seed`` and the job's name (identical in every process, and
    the same for a job wherever it stands in the jobs file)."""
    return [LoRAAdapter(model, job.adapter, seed=seed * 7919 + _name_key(job.name), init_b=init_b)
            for job in plan.jobs]


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
def one_f_one_b_order(M: int, stages: int, stage: int) -> list[tuple[str, int]]:
    """1F1B order of ('F'|'B', microbatch) on one stage: S-s-1 warm-up forwards, then F/B pairs, then drain."""
    warm = min(stages - stage - 1, M)
    order = [("F", i) for i in range(warm)]
    for i in range(M - warm):
        order += [("F", warm + i), ("B", i)]
    return order + [("B", i) for i in range(M - warm, M)]


def _no_targets(plan) -> set[tuple[int, int]]:
    """The (job, global batch) pairs with no target token: every sample one token long (nothing to predict)."""
    return {key for key, n in _target_tokens(plan).items() if n == 0}


def _last_microbatch(plan) -> dict[int, list[int]]:
    """microbatch index -> jobs whose current global batch ends there (their optimizer steps after its backward).
    A global batch with no target token takes no step: its gradients are zero, and AdamW would still move the
    adapter on its moments alone."""
    last: dict[tuple[int, int], int] = {}
    for i, mb in enumerate(plan.microbatches):
        for seg in mb.segments:
            last[(seg.job, seg.global_batch)] = i
    empty = _no_targets(plan)
    out: dict[int, list[int]] = {}
    for (j, g), i in last.items():
        if (j, g) not in empty:
            out.setdefault(i, []).append(j)
    return out


def _optimizers(adapters: Sequence[LoRAAdapter], plan, layers: tuple[int, int]) -> list[torch.optim.Optimizer | None]:
    """Per job: AdamW over its parameters in ``layers`` (weight decay 0), or None when it has none there."""
    out = []
    for ad, job in zip(adapters, plan.jobs):
        params = [t for p in _stage_paths(ad, layers) for t in ad.pair(p)]  # (A, B) per path: _stage_keys' order
        out.append(torch.optim.AdamW(params, lr=job.lr, weight_decay=0.0) if params else None)
    return out


def _stage_paths(adapter: LoRAAdapter, layers: tuple[int, int]) -> list[str]:
    """The adapter's module paths (``layers.{i}. ...``) in ``layers``, in order."""
    return [p for p in adapter.paths if layers[0] <= int(p.split(".")[1]) < layers[1]]


def check_plan(plan, model: TinyCausalLM, stages: int, where: str = "plan") -> None:
    """InputError unless the plan fits the model (sample lengths) and ``stages`` pipeline ranks (dependency rule);
    ``where`` names the plan in the error (the ``--plan`` file, or the jobs file it was planned from)."""
    if max(plan.lengths) > model.cfg.max_positions:
        raise InputError(where, f"longest sample {max(plan.lengths)} tokens > model max_positions "
                                f"{model.cfg.max_positions}")
    bad = plan.dependency_violations(stages)
    if bad:
        a, g, f, l = bad[0]
        raise InputError(where, f"made for {plan.stages} stages: job {plan.jobs[a].name!r} global batch {g} starts "
                                f"at microbatch {f}, fewer than {stages} after {l}, on {stages} pipeline stages (one "
                                f"per rank: NPROC / --world) - re-plan with stages >= {stages}")


@dataclass
class TrainResult:
    losses: dict[tuple[int, int], float] = field(default_factory=dict)
    """(job, global batch) -> mean token loss of that global batch (before its optimizer step)"""
    microbatch_losses: list[float] = field(default_factory=list)
    """per executed microbatch, the loss it backpropagated: the sum over its jobs of (their tokens' CE sum here /
    their global batch's target tokens) - each job's share of its global-batch mean, not a mean of this microbatch"""
    steps: dict[int, int] = field(default_factory=dict)
    """job -> optimizer steps taken"""

    def by_job(self, plan) -> dict[str, list[float | None]]:
        """Per job name its global batches' mean token losses in order; None for one with no target token (every
        sample one token long: a mean over nothing, and no optimizer step was taken for it)."""
        empty = _no_targets(plan)
        out: dict[str, list[float | None]] = {}
        for (j, g), v in sorted(self.losses.items()):
            out.setdefault(plan.jobs[j].name, []).append(None if (j, g) in empty else v)
        return out


def _loss(logits: torch.Tensor, mb: PackedMicrobatch, sums: dict[tuple[int, int], float]) -> torch.Tensor:
    ce = F.cross_entropy(logits, mb.targets, ignore_index=-100, reduction="none")
    for job, s, e in mb.segments:
        key = (job, mb.global_batch[job])
        sums[key] = sums.get(key, 0.0) + float((ce[s:e] * mb.weights[s:e]).sum().detach())
    return (ce * mb.weights).sum()


# ---- resumable state -----------------------------------------------------------------------------------
_BLOB_FIELDS = frozenset({"cursor", "params", "grads", "optim", "losses", "microbatch_losses", "steps"})


class LoRATrainerState:
    """One rank's trainer state at a step boundary (see "Checkpoints" in the module docstring): a stateful object
    for :class:`~adasched.runtime.checkpoint.Checkpointer`. Its state dict is one serialized blob (torch.save of
    tensors and plain values), because its shape changes during a run (gradients and Adam moments appear, loss
    sums grow) while DCP loads tensors into a fresh run's pre-shaped ones."""

    def __init__(self, adapters: Sequence[LoRAAdapter], optimizers: Sequence[torch.optim.Optimizer | None],
                 result: TrainResult | None = None, cursor: int = 0):
        self.adapters = list(adapters)
        self.optimizers = list(optimizers)
        self.result = result if result is not None else TrainResult()
        self.cursor = cursor
        """steps done: plan microbatches [0, cursor) are finished"""

    def _params(self, j: int):
        ad = self.adapters[j]
        return [(f"{p}.{ab}", t) for p in ad.paths for ab, t in zip("AB", ad.pair(p))]

    def state_dict(self) -> dict:
        payload = {
            "cursor": int(self.cursor),
            "params": [{k: t.detach().clone() for k, t in self._params(j)} for j in range(len(self.adapters))],
            "grads": [{k: t.grad.detach().clone() for k, t in self._params(j) if t.grad is not None}
                      for j in range(len(self.adapters))],
            "optim": [o.state_dict() if o is not None else None for o in self.optimizers],
            "losses": [[j, g, v] for (j, g), v in sorted(self.result.losses.items())],
            "microbatch_losses": list(self.result.microbatch_losses),
            "steps": [[j, n] for j, n in sorted(self.result.steps.items())],
        }
        buf = io.BytesIO()
        torch.save(payload, buf)
        return {"blob": buf.getvalue()}

    def load_state_dict(self, state) -> None:
        # tensors and plain values only (weights_only) in this blob; the save around it is read by
        # torch.distributed.checkpoint, which unpickles its .metadata: a checkpoint folder must be trusted
        try:
            p = torch.load(io.BytesIO(state["blob"]), weights_only=True)
            missing = _BLOB_FIELDS - set(p)
        except Exception as err:  # a damaged blob: UnpicklingError, RuntimeError, EOFError, TypeError, ...
            why = " ".join(str(err).split())[:200]
            raise ValueError(f"checkpoint: the trainer state cannot be read ({type(err).__name__}: {why})") from None
        if missing:
            raise ValueError(f"checkpoint: the trainer state lacks {sorted(missing)}")
        if len(p["params"]) != len(self.adapters) or len(p["optim"]) != len(self.optimizers):
            raise ValueError("checkpoint: saved for another number of jobs")
        with torch.no_grad():
            for j in range(len(self.adapters)):
                params = dict(self._params(j))
                if set(params) != set(p["params"][j]):
                    raise ValueError(f"checkpoint: job {j}'s adapter modules differ from the saved ones")
                for k, t in params.items():
                    t.copy_(p["params"][j][k])
                    g = p["grads"][j].get(k)
                    t.grad = None if g is None else g.clone()
        for o, sd in zip(self.optimizers, p["optim"]):
            if (o is None) != (sd is None):
                raise ValueError("checkpoint: saved for another layer split")
            if o is not None:
                o.load_state_dict(sd)
        self.result.losses = {(int(j), int(g)): float(v) for j, g, v in p["losses"]}
        self.result.microbatch_losses = [float(v) for v in p["microbatch_losses"]]
        self.result.steps = {int(j): int(n) for j, n in p["steps"]}
        self.cursor = int(p["cursor"])


def _stage_keys(adapter: LoRAAdapter, layers: tuple[int, int]) -> list[str]:
    """``path.A`` / ``path.B`` of an adapter's matrices in ``layers``, in the order its stage optimizer holds them
    (:func:`_optimizers`)."""
    return [f"{p}.{ab}" for p in _stage_paths(adapter, layers) for ab in "AB"]


def reshard_trainer_blobs(blobs: Sequence[bytes], adapters: Sequence[LoRAAdapter], num_layers: int, *,
                          stages: int, stage: int) -> dict:
    """The state dict (``{"blob": ...}``) of ``stage`` of ``stages`` from the saved blobs of every stage of another
    split (one per saved rank, :meth:`LoRATrainerState.state_dict`): each adapter matrix from the stage that held its
    layer, and for this stage's matrices their accumulated gradients; per job the AdamW state of this stage's matrices
    re-indexed from the saving stages' optimizers (their param group's settings); the cursor (equal on every stage) from
    stage 0; the loss sums and microbatch losses from the last stage, which computed them, and the optimizer-step counts
    from it too (every stage counts them alike). Every new stage gets the same counts and losses (only the last one's
    are reported). ValueError for a damaged blob or one of another job count."""
    old = []
    for k, blob in enumerate(blobs):
        try:
            p = torch.load(io.BytesIO(blob), weights_only=True)
            missing = sorted(_BLOB_FIELDS - set(p))
        except Exception as err:  # noqa: BLE001 - a damaged blob: one line, as load_state_dict says it
            why = " ".join(str(err).split())[:200]
            raise ValueError(f"checkpoint: the trainer state of saved stage {k} cannot be read "
                             f"({type(err).__name__}: {why})") from None
        if missing:
            raise ValueError(f"checkpoint: the trainer state of saved stage {k} lacks {missing}")
        if len(p["params"]) != len(adapters) or len(p["grads"]) != len(adapters) or len(p["optim"]) != len(adapters):
            raise ValueError(f"checkpoint: saved stage {k} holds {len(p['params'])} jobs, this run has "
                             f"{len(adapters)}")
        old.append(p)
    ranges = [stage_layers(num_layers, len(old), k) for k in range(len(old))]

    def owner(key: str) -> int:
        li = int(key.split(".")[1])
        return next(k for k, (lo, hi) in enumerate(ranges) if lo <= li < hi)

    mine = stage_layers(num_layers, stages, stage)
    out = {"cursor": old[0]["cursor"], "params": [], "grads": [], "optim": [], "losses": old[-1]["losses"],
           "microbatch_losses": old[-1]["microbatch_losses"], "steps": old[-1]["steps"]}
    for j, ad in enumerate(adapters):
        keys, new_keys = _stage_keys(ad, (0, num_layers)), _stage_keys(ad, mine)
        out["params"].append({k: old[owner(k)]["params"][j][k] for k in keys})
        # gradients only for this stage's matrices: only its optimizers zero them after their step
        out["grads"].append({k: old[owner(k)]["grads"][j][k] for k in new_keys if k in old[owner(k)]["grads"][j]})
        if not new_keys:
            out["optim"].append(None)
            continue
        where = {k: (s, i) for s, rng in enumerate(ranges) for i, k in enumerate(_stage_keys(ad, rng))}
        state = {}
        for i, k in enumerate(new_keys):
            s, idx = where[k]
            saved = old[s]["optim"][j]
            if saved is not None and idx in saved["state"]:  # (none before the matrix's first step)
                state[i] = saved["state"][idx]
        src = next(o["optim"][j] for o in old if o["optim"][j] is not None)
        group = {**src["param_groups"][0], "params": list(range(len(new_keys)))}
        out["optim"].append({"state": state, "param_groups": [group]})
    buf = io.BytesIO()
    torch.save(out, buf)
    return {"blob": buf.getvalue()}


def trainer_state(model: TinyCausalLM, adapters: Sequence[LoRAAdapter], plan, *, stages: int = 1,
                  stage: int = 0) -> LoRATrainerState:
    """A fresh state (step 0) for ``stage`` of ``stages``: AdamW per job over its adapter matrices in that stage's
    layers."""
    return LoRATrainerState(adapters, _optimizers(adapters, plan, stage_layers(model.cfg.layers, stages, stage)))


def checkpoint_points(start: int, total: int, every: int) -> list[int]:
    """Step boundaries after ``start`` up to ``total``: the multiples of ``every`` (0 = none) and ``total``."""
    pts = list(range((start // every + 1) * every, total, every)) if every > 0 else []
    return pts + [total] if total > start else []


def _check_state(state: LoRATrainerState, plan) -> None:
    if not 0 <= state.cursor <= len(plan.microbatches):
        raise ValueError(f"checkpoint: step {state.cursor} is outside the plan's {len(plan.microbatches)} "
                         f"microbatches")


# ---- single process -------------------------------------------------------------------------------------
def train_plan(model: TinyCausalLM, adapters: Sequence[LoRAAdapter], plan, data: SyntheticLoRAData, *,
               fused: bool = True, seed: int = 0, state: LoRATrainerState | None = None, checkpoint_every: int = 0,
               on_checkpoint: Callable[[int], None] | None = None) -> TrainResult:
    """Execute the microbatches of ``plan`` in order on all layers (one process), from ``state.cursor`` (a fresh
    :func:`trainer_state` by default) to the end; ``on_checkpoint(step)`` after every ``checkpoint_every``
    microbatches and after the last."""
    check_plan(plan, model, 1)
    counts = _target_counts(plan)
    if state is None:
        state = trainer_state(model, adapters, plan)
    _check_state(state, plan)
    opts, res = state.optimizers, state.result
    steps_at = _last_microbatch(plan)
    points = set(checkpoint_points(state.cursor, len(plan.microbatches), checkpoint_every))
    for i in range(state.cursor, len(plan.microbatches)):
        mb = pack_microbatch(plan, i, data, counts)
        if mb is None:
            state.cursor = i + 1
            if on_checkpoint is not None and i + 1 in points:
                on_checkpoint(i + 1)
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
        state.cursor = i + 1
        if on_checkpoint is not None and i + 1 in points:
            on_checkpoint(i + 1)
    return res


# ---- pipeline over a process group ------------------------------------------------------------------------
def train_plan_pipeline(model: TinyCausalLM, adapters: Sequence[LoRAAdapter], plan, data: SyntheticLoRAData, *,
                        group=None, fused: bool = True, seed: int = 0, state: LoRATrainerState | None = None,
                        checkpoint_every: int = 0, on_checkpoint: Callable[[int], None] | None = None) -> TrainResult:
    """1F1B over the ranks of ``group`` (stage = rank): rank s holds layers ``stage_layers(L, S, s)``, the
    embedding on rank 0, the final norm + head and the loss on the last rank. Activations go forward and their
    gradients backward with point-to-point send/recv; no-op microbatches are skipped by every rank. Each rank
    steps a job's optimizer (its own layers' parameters) after the backward of that job's last microbatch of
    the global batch. Returns the losses on the last rank (empty elsewhere).

    Starts at ``state.cursor`` (a fresh :func:`trainer_state` of this stage by default). With
    ``checkpoint_every=N`` the 1F1B schedule runs on chunks of the plan that end at the multiples of N and
    drains after each (nothing in flight), then every rank calls ``on_checkpoint(step)`` (also after the last
    chunk)."""
    import torch.distributed as dist

    S, s = dist.get_world_size(group), dist.get_rank(group)
    check_plan(plan, model, S)
    peer = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
    layers = stage_layers(model.cfg.layers, S, s)
    counts = _target_counts(plan)
    if state is None:
        state = trainer_state(model, adapters, plan, stages=S, stage=s)
    _check_state(state, plan)
    opts, res = state.optimizers, state.result
    steps_at = _last_microbatch(plan)
    H = model.cfg.hidden
    live: dict[int, tuple] = {}
    pending: list = []
    begin = state.cursor
    for end in checkpoint_points(state.cursor, len(plan.microbatches), checkpoint_every):
        pending = _one_f_one_b_chunk(model, adapters, plan, data, range(begin, end), S, s, group, peer, layers,
                                     counts, opts, steps_at, res, fused, seed, H, live, pending)
        for w, _ in pending:  # drained: every send of the chunk delivered
            w.wait()
        pending = []
        assert not live
        state.cursor = begin = end
        if on_checkpoint is not None:
            on_checkpoint(end)
    return res


def _one_f_one_b_chunk(model, adapters, plan, data, idx: range, S: int, s: int, group, peer, layers, counts, opts,
                       steps_at, res: TrainResult, fused: bool, seed: int, H: int, live: dict, pending: list) -> list:
    """1F1B of this stage over the plan microbatches ``idx`` (a chunk that starts and ends with an empty
    pipeline); returns the sends still in flight."""
    import torch.distributed as dist

    first, last = s == 0, s == S - 1
    for op, k in one_f_one_b_order(len(idx), S, s):
        i = idx[k]
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
    return pending


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


#: what :func:`save_adapters` writes: per job OUT/<job name>/<ADAPTER_FILES>, and OUT/losses.json
LOSSES_FILE = "losses.json"


def check_adapter_outputs(out_dir: str | Path, plan) -> None:
    """Raise InputError('--out', ...) where :func:`save_adapters` could not write after training: OUT/<job> a
    file, one of its two files a folder, OUT/losses.json a folder (found after the training, with some adapters
    already written, the error was 'File exists')."""
    from adasched.profiler.io import InputError

    out = Path(out_dir)
    for job in plan.jobs:
        d = out / job.name
        if d.is_symlink() and not d.exists():  # (exists() is False for it: passed --check, failed after training)
            raise InputError("--out", f"{d} is a link to nothing: job {job.name!r}'s adapter is saved in a folder of "
                                      f"that name")
        if d.exists() and not d.is_dir():
            raise InputError("--out", f"{d} is a file: job {job.name!r}'s adapter is saved in a folder of that name")
        for name in ADAPTER_FILES:
            if (d / name).is_dir():
                raise InputError("--out", f"{d / name} is a folder: job {job.name!r}'s adapter writes a file there")
    if (out / LOSSES_FILE).is_dir():
        raise InputError("--out", f"{out / LOSSES_FILE} is a folder: the run's losses are written to a file there")


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
        from adasched.profiler.io import finite_json  # (a diverged run wrote NaN: not JSON to strict parsers)

        atomic_write_text(out / LOSSES_FILE, json.dumps(finite_json(
            {"per_global_batch": result.by_job(plan), "microbatch": result.microbatch_losses,
             "optimizer_steps": {job.name: result.steps.get(j, 0) for j, job in enumerate(plan.jobs)}}), indent=1,
            allow_nan=False) + "\n")
    return paths
