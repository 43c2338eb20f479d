"""Train a tiny GPT under torchrun by executing a FlexSP plan (variable-degree Ulysses SP per micro-batch).

    torchrun --standalone --nproc_per_node=4 -m adasched.launch.train_sp --plan plan.json --steps 2 --check-reference
    NPROC=4 launch/train_sp.sh --plan plan.json --steps 2 --check-reference
    NPROC=4 launch/train_sp.sh --plan plan.json --steps 8 --lr-schedule rex --warmup-steps 2 \
        --checkpoint-dir ckpt --checkpoint-every 2      # run it again after an interruption: it resumes

Semantics
- Training step i executes plan step i mod K (K = steps in the plan). Per micro-batch, each rank finds the group
  that lists it (a rank in no group idles), builds that group's sequences, takes its contiguous token shard of
  their packing and runs forward + backward; attention exchanges tokens and heads inside the group.
- Data: sequence j of step i is synthetic: token ids x_t = (x_0 + t * stride) mod vocab with x_0 in [0, vocab)
  and stride in [1, 7] drawn from a generator seeded by (seed, i, j), so every rank rebuilds any sequence without
  exchanging data and the model has something learnable.
- Lengths: the plan's lengths, scaled by max_len / (longest length in the plan) when that is longer than
  --max-len (rounded, at least 2 tokens), so plans made for 100K-token contexts run on a CPU. The scale factor
  is printed.
- Loss = mean next-token cross-entropy over every target token of the global batch (all micro-batches). Each
  rank's partial gradients (its tokens, its micro-batches) are summed over the world with one all-reduce, then
  one optimizer step per global batch; all ranks hold identical parameters.
- --check-reference: rank 0 recomputes each step's loss and gradients in one process (whole batch, degree 1,
  same parameters) and prints the largest differences; a difference beyond the dtype's tolerance is an error.

- --lr-schedule linear|cosine|rex|uba (default constant: the --lr of every step, no scheduler) with
  --warmup-steps W: ``adasched.schedules.get_schedule(name, optimizer, num_warmup_steps=W,
  num_training_steps=steps)``, stepped once per optimizer step; each step prints the lr the optimizer used.

Checkpoints
- --checkpoint-dir DIR (with --checkpoint-every N, --checkpoint-keep K, --checkpoint-async, --load-step STEP) saves
  the run with
  torch.distributed.checkpoint after every N completed steps and at the end, and a launch whose DIR holds a save
  resumes from the newest (or STEP's: its first save then deletes the saves after STEP, another timeline) and
  trains on to --steps; rank 0 prints `resumed from DIR at step N`. A resumed run is bit for bit the
  uninterrupted one on CPU (tested with float32). A --checkpoint-dir that cannot be created is refused before
  the run, and a save that rank 0 cannot write or commit stops every rank with that error.
- Saved state (every rank its own): the model and its Adam state (moments, step counts, the lr of the param group);
  the LR scheduler (its step, last lr); torch's global generator and Python's `random` (nothing draws from them
  after the model's init today; kept so that dropout or sampling added later resumes right); the step counter.
  That is all that decides the future: the data of step i is a pure function of (--seed, i, sequence id) and of
  the plan (step i runs plan step i mod K), gradients are zeroed and all-reduced within a step, and the
  --check-reference model is reloaded from the trained model's weights before every step (so a resumed run
  checks against the resumed weights).
- The run's identity (saved with each checkpoint, checked before any process group exists) is: the plan's
  execution (world size, lengths, groups: a digest), the plan's batches (each step's lengths: a digest), --seed,
  --max-len, --layers, --head-dim, the model's heads, --lr, --dtype, --lr-schedule and --warmup-steps, and --steps
  when the schedule is not constant (its horizon). With the constant schedule --steps may grow between launches; a
  save at or beyond --steps leaves nothing to train (exit 0). A save of another run, a --load-step that was not
  saved, or a checkpoint option without --checkpoint-dir is one `error:` line, exit 2, nothing written.
- Resharded resume: every saved entry is replicated (each rank holds the same model, optimizer, scheduler,
  generators and counter), so a save of the same run re-planned for another number of GPUs (or another plan of
  the same batches: `plan sp` with the same --seqlens, --global-batch, --seed and --steps, other --gpus) resumes
  with every rank loading rank 0's copy; rank 0 prints `resharded: ...`. Only the plan's execution digest may
  differ then - the model may not: give a fixed --heads (the default follows the plan's largest SP degree, so
  another --gpus may change it; a resume refused for that names --heads; any head count runs any degree, a degree
  that does not divide it splitting the heads unevenly). The step after the resume equals the uninterrupted run's
  to float rounding (other groups sum the gradients in another order), not bit for bit. A save made before the
  identity held the batches digest resumes on its own plan.

A plan that does not fit the world (world size, ranks, sequence ids) is rejected with one
`error:` line and exit code 2 before any process group is created.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence

from adasched.launch.cli_args import (MAX_LAYERS, add_checkpoint_args, add_lr_schedule_args, check_lr_schedule,
                                      checkpoint_config, checkpoint_identity, lr_identity, lr_scheduler)
from adasched.planner.ui import OneLineArgParser, reports_errors
from adasched.profiler.io import MIN_COLLECTIVE_TIMEOUT_S, InputError, check_model_memory, check_seconds, error_line
from adasched.runtime.sp_model_spec import param_count

__all__ = ["main", "parse_args", "check_plan", "check_model_fits", "scaled_lengths", "make_sequence", "launch_local",
           "run_identity", "plan_digest", "batches_digest"]

TOLERANCE = {"float32": 1e-5, "float64": 1e-10}  # max |grad - ref| / max |ref|, and |loss - ref| / |ref|


def reference_diff(loss: float, grads: list, ref_loss: float, ref_grads: list) -> tuple[float, float]:
    """(relative loss difference, largest gradient difference over the reference's largest gradient element) of a
    step against the single-process reference; NaN when any of them is not finite (Python's max() over
    per-parameter floats dropped a NaN that was not first: a NaN gradient passed the check)."""
    import torch

    dl = abs(loss - ref_loss) / max(abs(ref_loss), 1e-30)
    scale = float(torch.stack([g.abs().max() for g in ref_grads]).max())
    dg = float(torch.stack([(p - g).abs().max() for p, g in zip(grads, ref_grads)]).max()) / scale
    return dl, dg


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineArgParser(prog="python -m adasched.launch.train_sp",
                                description="Train a tiny GPT executing a FlexSP plan (run under torchrun).")
    p.add_argument("--plan", required=True, help="SP plan JSON (adasched plan sp)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: the plan's step count); a resumed constant-lr run may raise it")
    p.add_argument("--check-reference", action="store_true",
                   help="compare every step's loss and gradients with a single-process run on rank 0")
    p.add_argument("--seed", type=int, default=0, help="model init, data and Python random seed "
                   "(default: %(default)s)")
    p.add_argument("--max-len", type=int, default=256,
                   help="longest sequence after scaling the plan's lengths (tokens; default: "
                   "%(default)s)")
    p.add_argument("--layers", type=int, default=2, help="transformer layers (default: %(default)s)")
    p.add_argument("--head-dim", type=int, default=8, help="width of one attention head; the model width is "
                   "heads x head-dim (default: %(default)s)")
    p.add_argument("--heads", type=int, default=None,
                   help="attention heads (default: max(4, largest SP degree in the plan))")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (the peak with --lr-schedule; "
                   "default: %(default)s)")
    add_lr_schedule_args(p)
    p.add_argument("--dtype", choices=sorted(TOLERANCE), default="float32", help="parameter and activation dtype; "
                   "sets --check-reference's tolerance (default: %(default)s)")
    p.add_argument("--backend", choices=["gloo", "nccl"], default=None, help="default: nccl with CUDA, else gloo")
    p.add_argument("--timeout", type=float, default=120.0, help="collective timeout (s; default: %(default)s)")
    p.add_argument("--check-plan-only", action="store_true",
                   help="only validate the plan against --world (or WORLD_SIZE) and exit")
    p.add_argument("--world", type=int, default=None, help="world size to validate against (--check-plan-only)")
    add_checkpoint_args(p)
    args = p.parse_args(argv)
    if not args.plan.strip():  # (read as Path(""), ".": the error said '.: is a directory')
        raise InputError("--plan", "is empty")
    if args.world is not None and not args.check_plan_only:  # torchrun's world is the run's; --world was ignored
        raise InputError("--world", "only with --check-plan-only (under torchrun the world is torchrun's)")
    for name in ("steps", "max_len", "layers", "head_dim", "heads", "world"):
        val = getattr(args, name)
        if val is not None and val < 1:
            raise InputError(f"--{name.replace('_', '-')}", f"{val} must be >= 1")
    if args.max_len < 2:
        raise InputError("--max-len", f"{args.max_len} must be >= 2")
    if args.layers > MAX_LAYERS:
        raise InputError("--layers", f"{args.layers} must be <= {MAX_LAYERS}")
    # NaN passed a `<= 0` test; inf overflowed torch's timedelta; under 1 ms it is 0 (the store timed out at once)
    check_seconds("--timeout", args.timeout, least=MIN_COLLECTIVE_TIMEOUT_S)
    if not -2 ** 63 <= args.seed < 2 ** 64:  # torch.manual_seed's range (the model init)
        raise InputError("--seed", f"{args.seed} must be in [-2**63, 2**64)")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise InputError("--lr", f"{args.lr} must be a positive number")
    check_lr_schedule(args)  # the step count is known with the plan (main)
    checkpoint_config(args)  # the checkpoint options' own checks (InputError naming the option)
    if args.backend == "nccl":
        import torch

        if not torch.cuda.is_available():
            raise InputError("--backend", "nccl needs CUDA GPUs and this machine has none (use gloo)")
    return args


def check_plan(plan, world: int, where: str) -> None:
    """Reject a plan that this world cannot execute; raises InputError naming the plan field. The structure
    (ranks, every sequence once, lengths) is ``SPPlan.verify``; this adds the run's world. Any head count runs
    any degree (a degree that does not divide the heads splits them unevenly: runtime/ulysses.head_range)."""
    if plan.world_size != world:
        raise InputError(where, f"world_size: plan is for {plan.world_size} ranks but this run has {world} "
                                f"(torchrun --nproc_per_node={plan.world_size})")
    errors = plan.verify()
    if errors:
        raise InputError(where, errors[0])


def _nvidia_driver_present() -> bool:
    """An NVIDIA driver on this host, seen without importing torch."""
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")


def check_gpus(args: argparse.Namespace, world: int) -> None:
    """Refuse more ranks on this host than it has GPUs when the run uses nccl (--backend nccl, or none given and
    CUDA available): each rank binds cuda:LOCAL_RANK, and the ranks past the last GPU failed with "invalid device
    ordinal" tracebacks while the others waited in init_process_group until --timeout. Not for --check-plan-only
    (a plan check, which may run on a host without the GPUs)."""
    if args.check_plan_only or args.backend == "gloo":
        return
    import torch

    if args.backend is None and not torch.cuda.is_available():
        return
    gpus = torch.cuda.device_count()
    local_ranks = os.environ.get("LOCAL_WORLD_SIZE")  # the ranks on this host (torchrun sets it)
    if local_ranks is not None:
        if int(local_ranks) > gpus:
            raise InputError("NPROC", f"{local_ranks} ranks on this host but it has {gpus} GPU(s), one a rank with "
                                      f"nccl (torchrun --nproc_per_node={gpus} with a plan for that many, or --backend "
                                      "gloo)")
        return
    # another launcher (SLURM exporting LOCAL_RANK only): the world is no host's rank count; this rank's own GPU
    from adasched.runtime.dist import env_world

    local = env_world()[2]
    if local >= gpus:
        raise InputError("LOCAL_RANK", f"{local}, but this host has {gpus} GPU(s), one a rank with nccl (start at "
                                       f"most {gpus} ranks a host, or --backend gloo)")


def _heads(args: argparse.Namespace, plan) -> int:
    """The model's heads: --heads, else the plan's largest SP degree (at least 4)."""
    return args.heads or max(4, max(g.degree for st in plan.steps for mb in st.micro_batches for g in mb.groups))


def check_model_fits(args: argparse.Namespace, plan, world: int) -> None:
    """Refuse a model (--layers, --heads, --head-dim, --max-len) whose weights, gradients and Adam state on
    ``world`` CPU ranks exceed this host's memory (a gloo run; an nccl run keeps them on its GPUs)."""
    if args.backend == "nccl":
        return
    if args.backend is None:
        if args.check_plan_only:  # stays free of torch (launch/train_sp.sh's pre-check never passes --backend):
            if _nvidia_driver_present():  # a GPU host runs nccl; each rank's own check (with torch) follows
                return
        else:
            import torch

            if torch.cuda.is_available():
                return
    # the model _train builds (TinyGPTConfig's other sizes at their defaults), counted without torch
    params = param_count(_heads(args, plan) * args.head_dim, args.layers, args.max_len)
    from adasched.runtime.dist import env_int

    ranks = min(world, env_int("LOCAL_WORLD_SIZE", world))  # the ranks on this host
    check_model_memory(params, 4 * (8 if args.dtype == "float64" else 4), ranks,
                       "--layers/--heads/--head-dim/--max-len", "weights, gradients and Adam state")


def _total_steps(args: argparse.Namespace, plan) -> int:
    """Training steps of the run: --steps, else the plan's step count."""
    return args.steps or len(plan.steps)


def plan_digest(plan) -> str:
    """Digest of what the trainer executes from a plan: world size, each step's lengths, each micro-batch's groups
    (ranks, sequence ids). Predicted times and solver records do not change a run, so they are left out."""
    from adasched.planner.plan import inputs_digest

    return inputs_digest(plan.world_size, [
        [st.seqlens, [[[g.ranks, g.seq_ids] for g in mb.groups] for mb in st.micro_batches]] for st in plan.steps])


def batches_digest(plan) -> str:
    """Digest of the data a plan trains on, whatever its layout: each step's lengths (a plan of the same batches
    for another number of GPUs has the same digest)."""
    from adasched.planner.plan import inputs_digest

    return inputs_digest([st.seqlens for st in plan.steps])


#: Identity entries that describe only how the plan lays the work out (a resharded resume may change them).
LAYOUT_KEYS = ("plan",)


def saved_identity(plan):
    """The ``upgrade`` of a save's identity (:func:`~adasched.runtime.checkpoint.check_resumable`): a save made
    before the identity held "batches" resumes when its plan digest is this plan's (which covers every step's
    lengths); with another plan it stays without, and is refused as another run."""
    digest, batches = plan_digest(plan), batches_digest(plan)

    def upgrade(saved: dict) -> dict:
        if "batches" not in saved and saved.get("plan") == digest:
            saved["batches"] = batches
        return saved

    return upgrade


def run_identity(args: argparse.Namespace, plan) -> dict:
    """What makes a different run (saved with each checkpoint; a save of another identity is not resumed). The
    step count belongs to it only when the lr schedule's horizon depends on it (a constant-lr run may be
    extended by a later launch with a larger --steps)."""
    return {"trainer": "train_sp", "plan": plan_digest(plan), "batches": batches_digest(plan), "seed": args.seed,
            "max_len": args.max_len,
            "layers": args.layers, "head_dim": args.head_dim, "heads": _heads(args, plan), "dtype": args.dtype,
            **lr_identity(args, _total_steps(args, plan))}


def _check_checkpoint(args: argparse.Namespace, plan, world: int):
    """The save this run resumes from (None: a fresh run), refused with an InputError when it belongs to another
    run (another world size or plan of the same batches is a resharded resume); None too without
    --checkpoint-dir."""
    from adasched.runtime.checkpoint import check_resumable, find_checkpoint

    cfg = checkpoint_config(args)
    if cfg is None:
        return None
    info = find_checkpoint(cfg.folder, cfg.load_step)
    if info is not None:
        ident, heads = run_identity(args, plan), info.run.get("heads")
        if args.heads is None and isinstance(heads, int) and heads > 0 and heads != ident["heads"]:
            try:  # the default follows the plan's largest degree: is the model's heads all that differs?
                check_resumable(info, world, dict(ident, heads=heads), LAYOUT_KEYS, saved_identity(plan))
            except InputError:
                pass  # something else differs too: the full list below
            else:
                raise InputError("--heads", f"the save in {cfg.folder} is of a model with {heads} heads; without "
                                            f"--heads this plan's model has {ident['heads']} (its largest SP degree, "
                                            f"at least 4): pass --heads {heads} to resume it on this plan")
        check_resumable(info, world, ident, LAYOUT_KEYS, saved_identity(plan))
    return info


def scaled_lengths(plan, max_len: int) -> tuple[float, list[list[int]]]:
    """(factor, per-step lengths): lengths x factor, factor = min(1, max_len / longest), rounded, >= 2."""
    longest = max(max(st.seqlens) for st in plan.steps)
    factor = min(1.0, max_len / longest)
    return factor, [[min(max_len, max(2, round(s * factor))) for s in st.seqlens] for st in plan.steps]


def make_sequence(seed: int, step: int, seq_id: int, length: int, vocab: int):
    """Token ids of sequence ``seq_id`` of training step ``step`` (deterministic: same on every rank)."""
    import torch

    s = (seed * 1_000_003 + step) * 1_000_033 + seq_id
    # folded into manual_seed's range [-2**63, 2**64): --seed >= ~2**24 overflowed it on every rank
    g = torch.Generator().manual_seed(s if -2 ** 63 <= s < 2 ** 64 else s % 2 ** 64)
    x0 = int(torch.randint(0, vocab, (1,), generator=g))
    stride = int(torch.randint(1, 8, (1,), generator=g))
    return (x0 + stride * torch.arange(length)) % vocab


@dataclass
class _Run:
    args: argparse.Namespace
    plan: object
    lengths: list[list[int]]
    rank: int
    world: int
    device: object
    model: object
    pool: object


def _my_group(mb, rank: int):
    for g in mb.groups:
        if rank in g.ranks:
            return g
    return None


def _step_batch(run: _Run, it: int):
    k = it % len(run.plan.steps)
    return run.plan.steps[k], run.lengths[k]


def _forward_backward(run: _Run, it: int) -> tuple[float, int]:
    """This rank's share of step ``it``: forward + backward of its shard of every micro-batch it is in.
    Returns (its loss contribution, its token count)."""
    from adasched.runtime.sp_model import pack_sequences
    from adasched.runtime.ulysses import shard_range

    st, lens = _step_batch(run, it)
    total_targets = sum(s - 1 for s in lens)
    vocab = run.model.cfg.vocab
    loss_sum, tokens = 0.0, 0
    for mb in st.micro_batches:
        g = _my_group(mb, run.rank)
        if g is None:
            continue  # idle in this micro-batch
        batch = pack_sequences([make_sequence(run.args.seed, it, sid, lens[sid], vocab) for sid in g.seq_ids])
        ranks = sorted(g.ranks)
        a, b = shard_range(batch.num_tokens, len(ranks), ranks.index(run.rank))
        pg = run.pool.group(ranks) if len(ranks) > 1 else None
        tok, pos, tgt = (t.to(run.device) for t in batch.shard(a, b))
        loss = run.model.shard_loss(tok, pos, tgt, batch.cu_seqlens, pg, total_targets)
        loss.backward()
        loss_sum += float(loss.detach())
        tokens += b - a
    return loss_sum, tokens


def _all_reduce_grads(model) -> None:
    """Sum every parameter's gradient over the world (one flat buffer, one collective)."""
    import torch
    import torch.distributed as dist

    params = [p for p in model.parameters()]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    off = 0
    for p in params:
        n = p.numel()
        p.grad = flat[off:off + n].view_as(p).clone()
        off += n


REFERENCE_WAIT_S = 6 * 3600
"""How long the other ranks wait for rank 0's single-process reference of a step (``--check-reference``)."""


def _reference(run: _Run, ref_model, it: int) -> tuple[float, list]:
    """Single-process loss and gradients of step ``it`` (whole batch packed, degree 1) with the current params."""
    from adasched.runtime.sp_model import pack_sequences

    ref_model.load_state_dict(run.model.state_dict())
    ref_model.zero_grad(set_to_none=True)
    st, lens = _step_batch(run, it)
    vocab = run.model.cfg.vocab
    batch = pack_sequences([make_sequence(run.args.seed, it, sid, s, vocab) for sid, s in enumerate(lens)])
    tok, pos, tgt = (t.to(run.device) for t in batch.shard(0, batch.num_tokens))
    loss = ref_model.shard_loss(tok, pos, tgt, batch.cu_seqlens, None, sum(s - 1 for s in lens))
    loss.backward()
    return float(loss.detach()), [p.grad for p in ref_model.parameters()]


def _train(args: argparse.Namespace, plan, factor: float, lengths: list[list[int]]) -> int:
    import copy

    import torch
    import torch.distributed as dist

    from adasched.runtime.dist import check_same_on_every_rank, init_distributed
    from adasched.runtime.checkpoint import Checkpointer, ModelState, RNGState, Values, step_folder
    from adasched.runtime.pg_pool import get_pool, reset_pool
    from adasched.runtime.sp_model import TinyGPT, TinyGPTConfig

    rank, world = init_distributed(args.backend, timeout_s=args.timeout)
    ck = None
    try:
        backend = dist.get_backend()
        # each rank read --plan and its options itself: one run, or one line on every rank (a different copy of
        # the plan on a node without a shared file system trained in silence on mismatched batches, or hung)
        # (--check-reference too: ranks disagreeing on it created the reference's wait group on some ranks only)
        # (and the checkpoint options, which decide collectives - the async saves' own group, resume, the periodic
        # saves: a rank given --checkpoint-async alone waited in new_group until --timeout, with a traceback; they
        # are not in run_identity, which a save keeps: a resume with another --checkpoint-every is the same run)
        mine = {**run_identity(args, plan), "check_reference": bool(args.check_reference),
                "checkpoint": checkpoint_identity(checkpoint_config(args))}
        check_same_on_every_rank(mine, args.plan)
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if backend == "nccl" \
            else torch.device("cpu")
        dtype = getattr(torch, args.dtype)
        pool = get_pool(timeout_s=args.timeout)
        heads = _heads(args, plan)
        cfg = TinyGPTConfig(hidden=heads * args.head_dim, heads=heads, layers=args.layers, max_len=args.max_len)
        torch.manual_seed(args.seed)
        random.seed(args.seed)  # nothing draws from it today; seeded so that the saved generators are the seed's
        model = TinyGPT(cfg).to(device=device, dtype=dtype)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        steps = _total_steps(args, plan)
        sched = lr_scheduler(args, opt, steps)
        run = _Run(args, plan, lengths, rank, world, device, model, pool)
        say = print if rank == 0 else (lambda *a, **k: None)
        # everything that decides the rest of the run (module docstring, "Checkpoints")
        progress = Values(step=0)
        state = {"model": ModelState(model, [opt]), "rng": RNGState(), "progress": progress}
        if sched is not None:
            state["lr_schedule"] = sched
        cfg_ck = checkpoint_config(args)
        ck = (Checkpointer(cfg_ck, run=run_identity(args, plan), timeout_s=args.timeout, layout_keys=LAYOUT_KEYS,
                           replicated=state, upgrade=saved_identity(plan))  # every entry is replicated
              if cfg_ck is not None else None)
        start = ck.resume(state) if ck is not None else 0
        if start != progress["step"]:  # every rank loaded the same save: all raise, main prints one line
            raise InputError(step_folder(cfg_ck.folder, start), f"holds the state after {progress['step']} steps, "
                             f"its metadata says step {start} (a copied or edited save); resume from another "
                             f"--load-step or a new --checkpoint-dir")
        if start > 0:
            say(f"resumed from {cfg_ck.folder} at step {start}", flush=True)
        if ck is not None and ck.resharded_from is not None:
            old = ck.resharded_from
            say(f"resharded: the save was made by {old.world_size} ranks with plan {old.run.get('plan')}; every "
                f"rank loaded rank 0's copy (this run: {world} ranks, plan {plan_digest(plan)})", flush=True)
        if start >= steps:
            say(f"train_sp: {step_folder(cfg_ck.folder, start)} is at step {start} and the run has {steps} steps "
                f"(--steps): nothing left to train", flush=True)
            return 0
        # made after the resume for clarity; _reference loads the trained model's weights before every step anyway
        ref_model = copy.deepcopy(model) if (args.check_reference and rank == 0) else None
        # the other ranks wait for rank 0's reference here, on a group of its own with a long timeout: they waited
        # in the step's first all-to-all, bounded by --timeout, and a reference slower than it crashed the run
        ref_wait = (dist.new_group(list(range(world)), timeout=timedelta(seconds=REFERENCE_WAIT_S))
                    if args.check_reference and world > 1 else None)
        say(f"train_sp: world {world} ({backend}), plan {args.plan}: {len(plan.steps)} steps, running {steps}"
            f"{f' from step {start}' if start else ''}; model {cfg.layers} layers, hidden {cfg.hidden}, "
            f"{cfg.heads} heads, {args.dtype}; lengths x{factor:.4g} (max {args.max_len}); lr {args.lr:g} "
            f"{args.lr_schedule}" + (f" (warmup {args.warmup_steps})" if args.warmup_steps else ""), flush=True)
        worst_loss = worst_grad = 0.0
        tol = TOLERANCE[args.dtype]
        for it in range(start, steps):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            ref = _reference(run, ref_model, it) if ref_model is not None else None
            if ref_wait is not None:
                dist.barrier(group=ref_wait)
            loss_part, my_tokens = _forward_backward(run, it)
            _all_reduce_grads(model)
            stats = torch.tensor([loss_part, float(my_tokens)], dtype=torch.float64, device=device)
            dist.all_reduce(stats)
            loss, tokens = float(stats[0]), int(stats[1])
            st, lens = _step_batch(run, it)
            lr = opt.param_groups[0]["lr"]  # what opt.step() below applies
            msg = (f"step {it}: plan step {st.step}, {len(lens)} seqs, {tokens} tokens, "
                   f"{len(st.micro_batches)} micro-batches, lr {lr!r}, loss {loss!r}")  # repr: exact floats
            failed = None
            if ref is not None:
                ref_loss, ref_grads = ref
                dl, dg = reference_diff(loss, [p.grad for p in model.parameters()], ref_loss, ref_grads)
                worst_loss, worst_grad = max(worst_loss, dl), max(worst_grad, dg)
                msg += f" (reference {ref_loss:.6f}; rel. diff loss {dl:.2e}, grads {dg:.2e})"
                if not (dl <= tol and dg <= tol):
                    failed = f"step {it}: difference from the single-process reference (loss {dl:.2e}, " \
                             f"grads {dg:.2e}) exceeds {tol:g}"
            say(msg + f", {time.perf_counter() - t0:.2f} s", flush=True)
            verdict = torch.tensor([1.0 if failed else 0.0], device=device)
            dist.broadcast(verdict, src=0)
            if float(verdict) > 0:
                say(f"error: --check-reference: {failed}", flush=True)
                return 1
            opt.step()
            if sched is not None:
                sched.step()
            progress["step"] = it + 1
            if ck is not None and ck.due(it + 1):
                where = ck.save(it + 1, state)
                say(f"checkpoint: step {it + 1} {'saving (in the background) to' if cfg_ck.async_save else 'saved to'} "
                    f"{where}", flush=True)
        if ck is not None:
            where = ck.save(steps, state)
            ck.finish()                                  # the save in flight (async): written and committed
            if where is not None or cfg_ck.async_save:   # (async: also when the periodic save was this step's)
                say(f"checkpoint: step {steps} saved to {step_folder(cfg_ck.folder, steps)}", flush=True)
        if args.check_reference:
            n, since = steps - start, f" (from step {start})" if start else ""
            say(f"check-reference: {n} step{'s' if n != 1 else ''}{since}, largest relative "
                f"difference: loss {worst_loss:.2e}, gradients {worst_grad:.2e} (tolerance {tol:g}, {args.dtype}): OK",
                flush=True)
        return 0
    finally:
        if ck is not None:  # an error path (--check-reference failed, an exception): a save in flight completes
            ck.close()      # with the peers still here before the groups go (a no-op after finish())
        reset_pool()
        if dist.is_initialized():
            dist.destroy_process_group()


def launch_local(plan: str | os.PathLike, nproc: int = 4, args: Sequence[str] = (), timeout_s: float = 600) -> int:
    """Run this script on ``nproc`` local ranks under torchrun (this interpreter), e.g. for `make demo`:
    ``launch_local("plan.json", 4, ["--steps", "2", "--check-reference"])``. The plan is validated first
    (returns 2 with one `error:` line when it does not fit). Output goes to this process's stdout/stderr.
    Returns the exit code."""
    import subprocess

    # (the caller's --world came after ours and won: the check passed for another world, then every rank failed
    # under torchrun with a traceback)
    own = next((a for a in args if a in ("--world", "--check-plan-only") or a.startswith("--world=")), None)
    if own is not None:
        print(f"error: {own.split('=')[0]}: launch_local sets it (the world is nproc={nproc}); leave it out of args",
              file=sys.stderr)
        return 2
    try:
        rc = main(["--plan", str(plan), "--check-plan-only", "--world", str(nproc), *args], quiet=True)
    except SystemExit as exc:  # argparse: usage error already printed
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if rc:
        return rc
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    from .proc import torchrun_tree

    try:
        return torchrun_tree(nproc, "adasched.launch.train_sp", ["--plan", str(plan), *args], env=env,
                             timeout_s=timeout_s, quiet_interrupt=True).returncode
    except subprocess.TimeoutExpired:  # torchrun and every rank are stopped (they lived on, still training)
        print(f"error: train_sp: {nproc} ranks did not finish within {timeout_s:g} s (stopped)", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None, quiet: bool = False) -> int:
    from adasched.planner.flexsp.plan import SPPlan
    from adasched.planner.plan import load_plan
    from adasched.runtime.dist import env_world

    rank = 0
    try:
        rank, world, _ = env_world()
        args = parse_args(argv)
        if args.check_plan_only and args.world is not None:
            world = args.world
        plan = load_plan(args.plan, expect=SPPlan)
        check_lr_schedule(args, _total_steps(args, plan))
        check_plan(plan, world, args.plan)
        check_model_fits(args, plan, world)
        check_gpus(args, world)
        _check_checkpoint(args, plan, world)  # before any process group: a mismatch is one line
        if args.check_plan_only and args.checkpoint_dir is not None:  # (the ranks' lock: one line here, not
            from adasched.runtime.checkpoint import check_folder_free  # inside torchrun)

            check_folder_free(args.checkpoint_dir)
        factor, lengths = scaled_lengths(plan, args.max_len)
    except ValueError as err:  # InputError included
        if rank == 0 or reports_errors():
            sys.stderr.write(error_line(err))
            sys.stderr.flush()
        return 2
    if args.check_plan_only:
        if not quiet:
            print(f"{args.plan}: {len(plan.steps)} steps fit world size {world}")
        return 0
    # a save at or past --steps: _train says "nothing left to train" once the ranks agree on it (Checkpointer.resume
    # compares their views) - deciding here, before any process group, rank 0 of a finished run on nodes without a
    # shared file system returned while the others waited for it in init_process_group until --timeout
    try:
        return _train(args, plan, factor, lengths)
    except ValueError as err:  # found only once running (a save that cannot be written, a resume on a machine
        # that sees another number of GPUs): one line from rank 0, exit 2, as train_moe and train_lora (InputError
        # is one). Every rank raises these alike; one raised by another rank alone is not said (as there)
        if rank == 0:
            sys.stderr.write(error_line(err))
            sys.stderr.flush()
        return 2


if __name__ == "__main__":
    sys.exit(main())
